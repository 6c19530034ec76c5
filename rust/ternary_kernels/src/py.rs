//! The `nanochat._ternary` Python module: validation at the boundary, then the GIL is released.
//!
//! Inputs are checked (type, dtype, ndim, shape, C-contiguity, values) and copied into owned Rust
//! buffers while holding the GIL; packing and every GEMV/GEMM run detached from it. Outputs are
//! numpy arrays that take ownership of the result vectors (no copy). Errors map through error.rs.

use std::sync::Arc;

use half::f16;

use numpy::ndarray::Array2;
use numpy::{
    dtype, Element, IntoPyArray, PyArray1, PyArray2, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::prelude::*;

use crate::decode;
use crate::error::{invalid, Error, Result};
use crate::format::TernaryShape;
use crate::kernels;
use crate::layer_ops;
use crate::matmul;
use crate::ops;
use crate::pack::{Int8Shape, PackedInt8, PackedTernary};
use crate::pool;

/// An owned copy of a C-contiguous numpy array of dtype T with one of the allowed ndims.
struct Owned<T> {
    data: Vec<T>,
    shape: Vec<usize>,
}

/// The numpy array `obj` as a C-contiguous array of T with one of the allowed ndims, and its shape.
fn checked_array<'a, 'py, T: Element>(
    arg: &'static str,
    obj: &'a Bound<'py, PyAny>,
    ndims: &[usize],
    dtype_name: &str,
) -> Result<(&'a Bound<'py, PyArrayDyn<T>>, Vec<usize>)> {
    let py = obj.py();
    let Ok(arr) = obj.cast::<PyUntypedArray>() else {
        let type_name = obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into());
        return Err(Error::WrongType {
            arg,
            msg: format!("expected a numpy.ndarray of {dtype_name}, got {type_name}"),
        });
    };
    let shape = arr.shape().to_vec();
    if !ndims.contains(&arr.ndim()) {
        let want = ndims.iter().map(|n| format!("{n}-D")).collect::<Vec<_>>().join(" or ");
        return Err(invalid(arg, format!("expected a {want} array, got {}-D with shape {shape:?}", arr.ndim())));
    }
    if !arr.dtype().is_equiv_to(&dtype::<T>(py)) {
        return Err(invalid(arg, format!("expected dtype {dtype_name}, got {}", arr.dtype())));
    }
    if !arr.is_c_contiguous() {
        return Err(invalid(arg, format!("array with shape {shape:?} is not C-contiguous (use np.ascontiguousarray)")));
    }
    let typed = obj.cast::<PyArrayDyn<T>>().map_err(|_| invalid(arg, format!("expected dtype {dtype_name}")))?;
    Ok((typed, shape))
}

fn read_array<T: Element + Copy>(
    arg: &'static str,
    obj: &Bound<'_, PyAny>,
    ndims: &[usize],
    dtype_name: &str,
) -> Result<Owned<T>> {
    let (typed, shape) = checked_array::<T>(arg, obj, ndims, dtype_name)?;
    let view = typed.try_readonly().map_err(|_| invalid(arg, "array is being written elsewhere"))?;
    let data = view.as_slice().map_err(|_| invalid(arg, "array is not contiguous"))?.to_vec();
    Ok(Owned { data, shape })
}

/// x as (data, tokens): 1-D [K] for gemv, 2-D [T, K] for gemm; K must be `cols`.
fn read_x(obj: &Bound<'_, PyAny>, ndim: usize, cols: usize) -> Result<(Vec<f32>, usize)> {
    let x = read_array::<f32>("x", obj, &[ndim], "float32")?;
    let k = *x.shape.last().unwrap_or(&0);
    if k != cols {
        return Err(invalid("x", format!("expected last dimension K = {cols}, got shape {:?}", x.shape)));
    }
    let tokens = if ndim == 1 { 1 } else { x.shape[0] };
    Ok((x.data, tokens))
}

/// Reads x ([K] for ndim 1, [T, K] for ndim 2) and runs `matmul(x, tokens)` with the GIL released;
/// returns the output and the token count.
fn detached_matmul(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    ndim: usize,
    cols: usize,
    matmul: impl FnOnce(&[f32], usize) -> Result<Vec<f32>> + Send,
) -> PyResult<(Vec<f32>, usize)> {
    let (x, tokens) = read_x(x, ndim, cols)?;
    let y = py.detach(move || matmul(&x, tokens))?;
    Ok((y, tokens))
}

fn to_2d<'py, T: Element>(
    py: Python<'py>,
    data: Vec<T>,
    rows: usize,
    cols: usize,
) -> PyResult<Bound<'py, PyArray2<T>>> {
    let arr = Array2::from_shape_vec((rows, cols), data)
        .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(format!("internal shape error: {e}")))?;
    Ok(arr.into_pyarray(py))
}

/// A ternary weight matrix W[m, k] = codes[m, k] * scales[m, k // group_size], packed 2 bits per weight.
///
/// Args:
///     codes: int8 [M, K], values in {-1, 0, 1}.
///     scales: float32 [M, ceil(K / group_size)].
///     group_size: 64, 128 or 256.
#[pyclass(name = "TernaryMatrix", module = "nanochat._ternary", frozen)]
pub struct PyTernaryMatrix {
    inner: Arc<PackedTernary>,
}

#[pymethods]
impl PyTernaryMatrix {
    #[new]
    #[pyo3(signature = (codes, scales, group_size = 128))]
    fn new(py: Python<'_>, codes: &Bound<'_, PyAny>, scales: &Bound<'_, PyAny>, group_size: i64) -> PyResult<Self> {
        let codes = read_array::<i8>("codes", codes, &[2], "int8")?;
        let scales = read_array::<f32>("scales", scales, &[2], "float32")?;
        if ![64, 128, 256].contains(&group_size) {
            return Err(invalid("group_size", format!("expected one of 64, 128, 256, got {group_size}")).into());
        }
        let shape = TernaryShape { rows: codes.shape[0], cols: codes.shape[1], group_size: group_size as usize };
        let want = [shape.rows, shape.groups()];
        if scales.shape != want {
            return Err(invalid(
                "scales",
                format!(
                    "expected shape {want:?} ([M, ceil(K / group_size)] for codes {:?}), got {:?}",
                    codes.shape, scales.shape
                ),
            )
            .into());
        }
        let pool = pool::global()?;
        let packed = py.detach(|| matmul::place_ternary(&codes.data, &scales.data, shape, &pool))?;
        Ok(PyTernaryMatrix { inner: Arc::new(packed) })
    }

    /// M, the number of outputs.
    #[getter]
    fn rows(&self) -> usize {
        self.inner.shape.rows
    }

    /// K, the number of inputs.
    #[getter]
    fn cols(&self) -> usize {
        self.inner.shape.cols
    }

    #[getter]
    fn group_size(&self) -> usize {
        self.inner.shape.group_size
    }

    /// Bytes held by the packed codes and scales (padding included).
    #[getter]
    fn nbytes(&self) -> usize {
        self.inner.nbytes()
    }

    /// y = W x_q for one token: float32 [K] -> float32 [M] (x quantized to int8 per token inside).
    fn gemv<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let m = self.inner.clone();
        let (y, _) = detached_matmul(py, x, 1, self.inner.shape.cols, move |x, tokens| {
            matmul::ternary_matmul(&m, x, tokens, kernels::active_isa()?, &*pool::global()?)
        })?;
        Ok(PyArray1::from_vec(py, y))
    }

    /// As `gemv`, with the rows cut into small chunks that idle threads steal (ops.rs): steadier on a
    /// machine whose cores are shared with other processes. Same result bit for bit.
    fn gemv_dynamic<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let m = self.inner.clone();
        let (y, _) = detached_matmul(py, x, 1, self.inner.shape.cols, move |x, tokens| {
            ops::ternary_matmul(&m, x, tokens, kernels::active_isa()?, pool::global()?.threads())
        })?;
        Ok(PyArray1::from_vec(py, y))
    }

    /// As `gemm`, scheduled like `gemv_dynamic`. Same result bit for bit.
    fn gemm_dynamic<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let m = self.inner.clone();
        let (y, tokens) = detached_matmul(py, x, 2, self.inner.shape.cols, move |x, tokens| {
            ops::ternary_matmul(&m, x, tokens, kernels::active_isa()?, pool::global()?.threads())
        })?;
        to_2d(py, y, tokens, self.inner.shape.rows)
    }

    /// Y = X W^T for a batch of tokens: float32 [T, K] -> float32 [T, M].
    fn gemm<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let m = self.inner.clone();
        let (y, tokens) = detached_matmul(py, x, 2, self.inner.shape.cols, move |x, tokens| {
            matmul::ternary_matmul(&m, x, tokens, kernels::active_isa()?, &*pool::global()?)
        })?;
        to_2d(py, y, tokens, self.inner.shape.rows)
    }

    /// (codes int8 [M, K], scales float32 [M, G]) exactly as given.
    fn unpack<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyArray2<i8>>, Bound<'py, PyArray2<f32>>)> {
        let m = self.inner.clone();
        let (codes, scales) = py.detach(move || m.unpack());
        let s = self.inner.shape;
        Ok((to_2d(py, codes, s.rows, s.cols)?, to_2d(py, scales, s.rows, s.groups())?))
    }

    fn __repr__(&self) -> String {
        let s = self.inner.shape;
        format!(
            "TernaryMatrix(rows={}, cols={}, group_size={}, nbytes={})",
            s.rows,
            s.cols,
            s.group_size,
            self.inner.nbytes()
        )
    }
}

/// An int8 weight matrix with one scale per row: W[m, k] = q[m, k] * scales[m] (e.g. the output head).
///
/// Args:
///     q: int8 [M, K].
///     scales: float32 [M].
#[pyclass(name = "Int8Matrix", module = "nanochat._ternary", frozen)]
pub struct PyInt8Matrix {
    inner: Arc<PackedInt8>,
}

impl PyInt8Matrix {
    fn build(py: Python<'_>, q: Vec<i8>, scales: Vec<f32>, shape: Int8Shape) -> PyResult<Self> {
        let pool = pool::global()?;
        let packed = py.detach(|| matmul::place_int8(&q, &scales, shape, &pool))?;
        Ok(PyInt8Matrix { inner: Arc::new(packed) })
    }
}

#[pymethods]
impl PyInt8Matrix {
    #[new]
    fn new(py: Python<'_>, q: &Bound<'_, PyAny>, scales: &Bound<'_, PyAny>) -> PyResult<Self> {
        let q = read_array::<i8>("q", q, &[2], "int8")?;
        let scales = read_array::<f32>("scales", scales, &[1], "float32")?;
        if scales.shape[0] != q.shape[0] {
            return Err(invalid(
                "scales",
                format!("expected shape [{}] (one per row of q {:?}), got {:?}", q.shape[0], q.shape, scales.shape),
            )
            .into());
        }
        let shape = Int8Shape { rows: q.shape[0], cols: q.shape[1] };
        Self::build(py, q.data, scales.data, shape)
    }

    /// Quantize float32 [M, K] per row: scale = max|w| / 127, q = round_half_even(w / scale).
    #[staticmethod]
    fn from_f32(py: Python<'_>, w: &Bound<'_, PyAny>) -> PyResult<Self> {
        let w = read_array::<f32>("w", w, &[2], "float32")?;
        let (rows, cols) = (w.shape[0], w.shape[1]);
        let (q, scales) = py.detach(|| PackedInt8::quantize_f32(&w.data, rows, cols))?;
        Self::build(py, q, scales, Int8Shape { rows, cols })
    }

    #[getter]
    fn rows(&self) -> usize {
        self.inner.shape.rows
    }

    #[getter]
    fn cols(&self) -> usize {
        self.inner.shape.cols
    }

    #[getter]
    fn nbytes(&self) -> usize {
        self.inner.nbytes()
    }

    /// y = W x_q for one token: float32 [K] -> float32 [M].
    fn gemv<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let m = self.inner.clone();
        let (y, _) = detached_matmul(py, x, 1, self.inner.shape.cols, move |x, tokens| {
            matmul::int8_matmul(&m, x, tokens, kernels::active_isa()?, &*pool::global()?)
        })?;
        Ok(PyArray1::from_vec(py, y))
    }

    /// As `gemv`, with the rows cut into small chunks that idle threads steal (ops.rs). Same result.
    fn gemv_dynamic<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let m = self.inner.clone();
        let (y, _) = detached_matmul(py, x, 1, self.inner.shape.cols, move |x, tokens| {
            ops::int8_matmul(&m, x, tokens, kernels::active_isa()?, pool::global()?.threads())
        })?;
        Ok(PyArray1::from_vec(py, y))
    }

    /// As `gemm`, scheduled like `gemv_dynamic`. Same result bit for bit.
    fn gemm_dynamic<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let m = self.inner.clone();
        let (y, tokens) = detached_matmul(py, x, 2, self.inner.shape.cols, move |x, tokens| {
            ops::int8_matmul(&m, x, tokens, kernels::active_isa()?, pool::global()?.threads())
        })?;
        to_2d(py, y, tokens, self.inner.shape.rows)
    }

    /// Y = X W^T: float32 [T, K] -> float32 [T, M].
    fn gemm<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let m = self.inner.clone();
        let (y, tokens) = detached_matmul(py, x, 2, self.inner.shape.cols, move |x, tokens| {
            matmul::int8_matmul(&m, x, tokens, kernels::active_isa()?, &*pool::global()?)
        })?;
        to_2d(py, y, tokens, self.inner.shape.rows)
    }

    /// (q int8 [M, K], scales float32 [M]).
    fn unpack<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyArray2<i8>>, Bound<'py, PyArray1<f32>>)> {
        let (q, scales) = self.inner.unpack();
        let s = self.inner.shape;
        Ok((to_2d(py, q, s.rows, s.cols)?, PyArray1::from_vec(py, scales)))
    }

    fn __repr__(&self) -> String {
        let s = self.inner.shape;
        format!("Int8Matrix(rows={}, cols={}, nbytes={})", s.rows, s.cols, self.inner.nbytes())
    }
}

/// Per-token int8 absmax quantization: float32 [T, K] (or [K]) -> (int8 same shape, float32 [T] (or [1]) = s).
#[pyfunction]
fn quantize_activations<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyArray1<f32>>)> {
    let x = read_array::<f32>("x", x, &[1, 2], "float32")?;
    let (tokens, cols) = if x.shape.len() == 1 { (1, x.shape[0]) } else { (x.shape[0], x.shape[1]) };
    let data = x.data;
    let (q, s) = py.detach(move || crate::act::quantize_activations(&data, tokens, cols));
    let q_arr =
        if x.shape.len() == 1 { PyArray1::from_vec(py, q).into_any() } else { to_2d(py, q, tokens, cols)?.into_any() };
    Ok((q_arr, PyArray1::from_vec(py, s)))
}

fn slice_of<'a>(arg: &'static str, a: &'a numpy::PyReadonlyArrayDyn<'_, f32>) -> Result<&'a [f32]> {
    a.as_slice().map_err(|_| invalid(arg, format!("array with shape {:?} is not C-contiguous", a.shape())))
}

/// RMSNorm over the last dim: x * (1 / sqrt(mean(x^2) + eps)) * weight; float32 x [..., D], weight [D].
#[pyfunction]
fn rms_norm<'py>(
    py: Python<'py>,
    x: numpy::PyReadonlyArrayDyn<'py, f32>,
    weight: numpy::PyReadonlyArrayDyn<'py, f32>,
    eps: f32,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let mut out = vec![0f32; x.len()];
    let (xs, ws) = (slice_of("x", &x)?, slice_of("weight", &weight)?);
    py.detach(|| layer_ops::rms_norm(xs, ws, eps, &mut out))?;
    Ok(numpy::ndarray::ArrayD::from_shape_vec(x.shape(), out)
        .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(format!("internal shape error: {e}")))?
        .into_pyarray(py))
}

/// SiLU(gate) * up: float32 gu [N, 2F] (gate then up) -> [N, F].
#[pyfunction]
fn silu_mul<'py>(py: Python<'py>, gu: numpy::PyReadonlyArrayDyn<'py, f32>) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let shape = gu.shape().to_vec();
    if shape.len() != 2 || shape[1] % 2 != 0 {
        return Err(invalid("gu", format!("expected a 2-D [N, 2F] array, got shape {shape:?}")).into());
    }
    let f = shape[1] / 2;
    let mut out = vec![0f32; shape[0] * f];
    let g = slice_of("gu", &gu)?;
    py.detach(|| layer_ops::silu_mul(g, f, &mut out))?;
    to_2d(py, out, shape[0], f)
}

/// The attention shape of float16 caches k_cache / v_cache [KVH, capacity, hd] with n_heads query heads,
/// and the caches as slices (both checked: same 3-D shape, C-contiguous).
fn attn_caches<'a>(
    k_cache: &'a mut numpy::PyReadwriteArrayDyn<'_, f16>,
    v_cache: &'a mut numpy::PyReadwriteArrayDyn<'_, f16>,
    n_heads: usize,
) -> Result<(layer_ops::AttnShape, &'a mut [f16], &'a mut [f16])> {
    let cs = k_cache.shape().to_vec();
    if cs.len() != 3 || v_cache.shape() != cs.as_slice() {
        return Err(invalid(
            "k_cache",
            format!("expected two [KVH, capacity, hd] caches, got {cs:?} and {:?}", v_cache.shape()),
        ));
    }
    let shape = layer_ops::AttnShape { n_heads, n_kv_heads: cs[0], head_dim: cs[2], capacity: cs[1] };
    let kc = k_cache.as_slice_mut().map_err(|_| invalid("k_cache", "not C-contiguous"))?;
    let vc = v_cache.as_slice_mut().map_err(|_| invalid("v_cache", "not C-contiguous"))?;
    Ok((shape, kc, vc))
}

/// One decode step of attention for one sequence: RoPE on q and k of qkv [q | k | v] (float32
/// [(H + 2 KVH) hd]) with full-width cos/sin [hd], k and v written (rounded) into the float16 caches
/// k_cache/v_cache [KVH, capacity, hd] at pos, softmax attention of each query head over positions
/// 0..=pos -> float32 [H hd].
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn attend_decode<'py>(
    py: Python<'py>,
    qkv: numpy::PyReadonlyArrayDyn<'py, f32>,
    cos: numpy::PyReadonlyArrayDyn<'py, f32>,
    sin: numpy::PyReadonlyArrayDyn<'py, f32>,
    mut k_cache: numpy::PyReadwriteArrayDyn<'py, f16>,
    mut v_cache: numpy::PyReadwriteArrayDyn<'py, f16>,
    pos: usize,
    n_heads: usize,
    scale: f32,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let (shape, kc, vc) = attn_caches(&mut k_cache, &mut v_cache, n_heads)?;
    let mut out = vec![0f32; n_heads * shape.head_dim];
    layer_ops::prefetch_cache(shape, kc, pos + 1);
    layer_ops::prefetch_cache(shape, vc, pos + 1);
    layer_ops::attend_decode(
        shape,
        slice_of("qkv", &qkv)?,
        slice_of("cos", &cos)?,
        slice_of("sin", &sin)?,
        kc,
        vc,
        pos,
        scale,
        &mut out,
    )?;
    Ok(PyArray1::from_vec(py, out))
}

/// Prefill attention of N new tokens of one sequence: qkv [N, (H + 2 KVH) hd] (float32, before RoPE),
/// full-width cos/sin [N, hd], every token's k and v written (rounded) into the float16 caches
/// k_cache/v_cache [KVH, capacity, hd] at pos0..pos0 + N, then token i attends over positions
/// 0..=pos0 + i -> float32 [N, H hd]. Per token the same bits as attend_decode; GIL released.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn attend_prefill<'py>(
    py: Python<'py>,
    qkv: numpy::PyReadonlyArrayDyn<'py, f32>,
    cos: numpy::PyReadonlyArrayDyn<'py, f32>,
    sin: numpy::PyReadonlyArrayDyn<'py, f32>,
    mut k_cache: numpy::PyReadwriteArrayDyn<'py, f16>,
    mut v_cache: numpy::PyReadwriteArrayDyn<'py, f16>,
    pos0: usize,
    n_heads: usize,
    scale: f32,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let (shape, kc, vc) = attn_caches(&mut k_cache, &mut v_cache, n_heads)?;
    if qkv.ndim() != 2 {
        return Err(invalid("qkv", format!("expected [N, (H + 2 KVH) hd], got shape {:?}", qkv.shape())).into());
    }
    let n = qkv.shape()[0];
    let mut out = vec![0f32; n * n_heads * shape.head_dim];
    let (q, c, s) = (slice_of("qkv", &qkv)?, slice_of("cos", &cos)?, slice_of("sin", &sin)?);
    let threads = pool::global()?.threads();
    py.detach(|| {
        layer_ops::prefetch_cache(shape, kc, pos0 + n);
        layer_ops::prefetch_cache(shape, vc, pos0 + n);
        layer_ops::attend_prefill(shape, q, c, s, kc, vc, pos0, scale, &mut out, threads)
    })?;
    to_2d(py, out, n, n_heads * shape.head_dim)
}

/// mHC read of streams xs [n, ..., D] (float32) with weights h_pre [n]: sum_i h_pre[i] xs[i] -> [..., D].
/// The engine's prefill and decode both call this, so their residual streams agree bit for bit.
#[pyfunction]
fn mhc_read<'py>(
    py: Python<'py>,
    xs: &Bound<'py, PyAny>,
    h_pre: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let (xs, shape) = checked_array::<f32>("xs", xs, &[2, 3, 4], "float32")?;
    let h_pre = read_array::<f32>("h_pre", h_pre, &[1], "float32")?;
    if shape[0] != h_pre.shape[0] {
        return Err(
            invalid("h_pre", format!("expected one weight per stream ({}), got {}", shape[0], h_pre.shape[0])).into()
        );
    }
    let xs = xs.try_readonly().map_err(|_| invalid("xs", "array is being written elsewhere"))?;
    let mut out = vec![0f32; xs.len() / shape[0]];
    let x = slice_of("xs", &xs)?;
    py.detach(|| layer_ops::mhc_read(x, &h_pre.data, &mut out))?;
    Ok(numpy::ndarray::ArrayD::from_shape_vec(&shape[1..], out)
        .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(format!("internal shape error: {e}")))?
        .into_pyarray(py))
}

/// mHC write, in place on xs [n, ..., D] (float32): xs[i] = sum_j h_res[i, j] xs[j] + h_post[i] y, y [..., D].
#[pyfunction]
fn mhc_write(
    py: Python<'_>,
    xs: &Bound<'_, PyAny>,
    y: &Bound<'_, PyAny>,
    h_res: &Bound<'_, PyAny>,
    h_post: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let (xs, shape) = checked_array::<f32>("xs", xs, &[2, 3, 4], "float32")?;
    let (y, y_shape) = checked_array::<f32>("y", y, &[shape.len() - 1], "float32")?;
    if y_shape != shape[1..] {
        return Err(
            invalid("y", format!("expected shape {:?} (one stream of xs), got {y_shape:?}", &shape[1..])).into()
        );
    }
    let h_res = read_array::<f32>("h_res", h_res, &[2], "float32")?;
    let h_post = read_array::<f32>("h_post", h_post, &[1], "float32")?;
    let n = shape[0];
    if h_res.shape != [n, n] || h_post.shape != [n] {
        return Err(invalid(
            "h_res",
            format!(
                "expected h_res [{n}, {n}] and h_post [{n}] for {n} streams, got {:?} and {:?}",
                h_res.shape, h_post.shape
            ),
        )
        .into());
    }
    let y = y.try_readonly().map_err(|_| invalid("y", "array is being written elsewhere"))?;
    let mut xs = xs.try_readwrite().map_err(|e| invalid("xs", format!("cannot write the array in place ({e})")))?;
    let xs = xs.as_slice_mut().map_err(|_| invalid("xs", "not C-contiguous"))?;
    let y = slice_of("y", &y)?;
    py.detach(|| layer_ops::mhc_write(xs, y, &h_res.data, &h_post.data))?;
    Ok(())
}

/// RoPE in place on the first `heads` heads of every row of x float32 [N, row] (e.g. q and k of a
/// prefill's qkv), with the rows' full-width cos/sin [N, hd].
#[pyfunction]
fn rope_rows(x: &Bound<'_, PyAny>, cos: &Bound<'_, PyAny>, sin: &Bound<'_, PyAny>, heads: usize) -> PyResult<()> {
    let (x, shape) = checked_array::<f32>("x", x, &[2], "float32")?;
    let cos = read_array::<f32>("cos", cos, &[2], "float32")?;
    let sin = read_array::<f32>("sin", sin, &[2], "float32")?;
    if cos.shape[0] != shape[0] || sin.shape != cos.shape {
        return Err(invalid(
            "cos",
            format!("expected cos and sin [N = {}, hd], got {:?} and {:?}", shape[0], cos.shape, sin.shape),
        )
        .into());
    }
    let mut x = x.try_readwrite().map_err(|e| invalid("x", format!("cannot write the array in place ({e})")))?;
    let x = x.as_slice_mut().map_err(|_| invalid("x", "not C-contiguous"))?;
    layer_ops::rope_rows(x, shape[1], heads, &cos.data, &sin.data)?;
    Ok(())
}

/// Causal softmax in place on attention scores float32 [..., r * c, s_len] (rows ordered head, then query):
/// query i of the chunk sits at position q0 + i and sees keys 0..=q0 + i; visible scores are multiplied by
/// scale and softmaxed, the rest become 0.
#[pyfunction]
fn causal_softmax(scores: &Bound<'_, PyAny>, c: usize, q0: usize, scale: f32) -> PyResult<()> {
    let (scores, shape) = checked_array::<f32>("scores", scores, &[2, 3, 4], "float32")?;
    let s_len = shape[shape.len() - 1];
    let mut scores =
        scores.try_readwrite().map_err(|e| invalid("scores", format!("cannot write the array in place ({e})")))?;
    let scores = scores.as_slice_mut().map_err(|_| invalid("scores", "not C-contiguous"))?;
    layer_ops::causal_softmax(scores, s_len, c, q0, scale)?;
    Ok(())
}

/// One sublayer's mHC matrices from Python: (h_pre [n], h_post [n], h_res [n, n]) float32 arrays.
fn read_mhc(arg: &'static str, mhc: MhcArgs<'_>) -> Result<Option<decode::Mhc>> {
    let Some((h_pre, h_post, h_res)) = mhc else { return Ok(None) };
    let h_pre = read_array::<f32>(arg, &h_pre, &[1], "float32")?.data;
    let h_post = read_array::<f32>(arg, &h_post, &[1], "float32")?.data;
    let h_res = read_array::<f32>(arg, &h_res, &[2], "float32")?.data;
    Ok(Some(decode::Mhc { h_pre, h_post, h_res }))
}

fn read_vec(arg: &'static str, obj: Option<&Bound<'_, PyAny>>) -> Result<Option<Vec<f32>>> {
    obj.map(|o| read_array::<f32>(arg, o, &[1], "float32").map(|a| a.data)).transpose()
}

/// The borrowed arguments of a decode step, checked against the layer's sizes.
struct StepArgs<'py> {
    xs: numpy::PyReadwriteArrayDyn<'py, f32>,
    cos: numpy::PyReadonlyArrayDyn<'py, f32>,
    sin: numpy::PyReadonlyArrayDyn<'py, f32>,
    ks: Vec<numpy::PyReadwriteArrayDyn<'py, f16>>,
    vs: Vec<numpy::PyReadwriteArrayDyn<'py, f16>>,
    positions: Vec<usize>,
}

impl StepArgs<'_> {
    /// The borrowed arrays as the decode step takes them: xs, the RoPE rows and one cache per sequence.
    fn views(&mut self) -> Result<(&mut [f32], decode::Rope<'_>, Vec<decode::SeqCache<'_>>)> {
        let rope = decode::Rope { cos: slice_of("cos", &self.cos)?, sin: slice_of("sin", &self.sin)? };
        let xs = self.xs.as_slice_mut().map_err(|_| invalid("xs", "not C-contiguous"))?;
        let mut caches = Vec::with_capacity(self.positions.len());
        for ((k, v), &pos) in self.ks.iter_mut().zip(self.vs.iter_mut()).zip(&self.positions) {
            let k = k.as_slice_mut().map_err(|_| invalid("k_caches", "not C-contiguous"))?;
            let v = v.as_slice_mut().map_err(|_| invalid("v_caches", "not C-contiguous"))?;
            caches.push(decode::SeqCache { k, v, pos });
        }
        Ok((xs, rope, caches))
    }
}

/// Check and borrow xs [n, B, D], cos/sin [B, hd], B caches each [*lead, capacity, hd] and B positions.
#[allow(clippy::too_many_arguments)]
fn step_args<'py>(
    layer: &decode::DecodeLayer,
    lead: &[usize],
    xs: &Bound<'py, PyAny>,
    cos: &Bound<'py, PyAny>,
    sin: &Bound<'py, PyAny>,
    k_caches: &[Bound<'py, PyAny>],
    v_caches: &[Bound<'py, PyAny>],
    positions: &[i64],
) -> Result<StepArgs<'py>> {
    let (n, d, hd) = (layer.streams(), layer.dim(), layer.head_dim());
    let (xs, shape) = checked_array::<f32>("xs", xs, &[3], "float32")?;
    let b = shape[1];
    if shape[0] != n || shape[2] != d || b == 0 {
        return Err(invalid("xs", format!("expected [n_streams = {n}, B > 0, D = {d}], got {shape:?}")));
    }
    let rope = |arg: &'static str, obj: &Bound<'py, PyAny>| -> Result<numpy::PyReadonlyArrayDyn<'py, f32>> {
        let (a, shape) = checked_array::<f32>(arg, obj, &[2], "float32")?;
        if shape != [b, hd] {
            return Err(invalid(arg, format!("expected [B = {b}, head_dim = {hd}], got {shape:?}")));
        }
        a.try_readonly().map_err(|_| invalid(arg, "array is being written elsewhere"))
    };
    let (cos, sin) = (rope("cos", cos)?, rope("sin", sin)?);
    for (arg, got) in [("k_caches", k_caches.len()), ("v_caches", v_caches.len()), ("positions", positions.len())] {
        if got != b {
            return Err(invalid(arg, format!("expected one per sequence (B = {b}), got {got}")));
        }
    }
    let mut ks = Vec::with_capacity(b);
    let mut vs = Vec::with_capacity(b);
    let mut pos = Vec::with_capacity(b);
    for i in 0..b {
        let (k, k_shape) = checked_array::<f16>("k_caches", &k_caches[i], &[lead.len() + 2], "float16")?;
        let (v, v_shape) = checked_array::<f16>("v_caches", &v_caches[i], &[lead.len() + 2], "float16")?;
        let capacity = k_shape[lead.len()];
        if k_shape[..lead.len()] != *lead || k_shape[lead.len() + 1] != hd || v_shape != k_shape {
            return Err(invalid(
                "k_caches",
                format!("sequence {i}: expected k and v caches {lead:?} + [capacity, {hd}], got {k_shape:?} and {v_shape:?}"),
            ));
        }
        if positions[i] < 0 || positions[i] as usize >= capacity {
            return Err(invalid(
                "positions",
                format!("sequence {i}: expected 0 <= position < {capacity}, got {}", positions[i]),
            ));
        }
        pos.push(positions[i] as usize);
        let busy = |arg: &'static str, e| {
            invalid(arg, format!("sequence {i}: cannot write the cache ({e}; the same cache twice?)"))
        };
        ks.push(k.try_readwrite().map_err(|e| busy("k_caches", e))?);
        vs.push(v.try_readwrite().map_err(|e| busy("v_caches", e))?);
    }
    let xs = xs.try_readwrite().map_err(|e| invalid("xs", format!("cannot write the array in place ({e})")))?;
    Ok(StepArgs { xs, cos, sin, ks, vs, positions: pos })
}

fn exec() -> Result<decode::Exec> {
    Ok(decode::Exec { isa: kernels::active_isa()?, threads: pool::global()?.threads() })
}

/// The decode step of one transformer layer, built once from its parts (the matrices are shared).
///
/// Args:
///     attn_norm, ffn_norm: float32 [D].  qkv: TernaryMatrix [(H + 2 KVH) hd, D] (q, k, v rows);
///     o: [D, H hd];  gate_up: [2 F, D] (gate rows, then up);  down: [D, F].
///     n_heads, n_kv_heads: H, KVH.  eps: RMSNorm epsilon.  scale: attention score scale.
///     attn_sub_norm [H hd], ffn_sub_norm [F]: optional.  attn_mhc, ffn_mhc: optional
///     (h_pre [n], h_post [n], h_res [n, n]) float32 tuples (both or neither).
#[pyclass(name = "DecodeLayer", module = "nanochat._ternary", frozen)]
pub struct PyDecodeLayer {
    inner: Arc<decode::DecodeLayer>,
}

type MhcArgs<'py> = Option<(Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>)>;

#[pymethods]
impl PyDecodeLayer {
    #[new]
    #[pyo3(signature = (attn_norm, qkv, o, ffn_norm, gate_up, down, n_heads, n_kv_heads, eps, scale,
                        attn_sub_norm = None, ffn_sub_norm = None, attn_mhc = None, ffn_mhc = None))]
    #[allow(clippy::too_many_arguments)]
    fn new<'py>(
        attn_norm: &Bound<'py, PyAny>,
        qkv: &Bound<'py, PyTernaryMatrix>,
        o: &Bound<'py, PyTernaryMatrix>,
        ffn_norm: &Bound<'py, PyAny>,
        gate_up: &Bound<'py, PyTernaryMatrix>,
        down: &Bound<'py, PyTernaryMatrix>,
        n_heads: usize,
        n_kv_heads: usize,
        eps: f32,
        scale: f32,
        attn_sub_norm: Option<&Bound<'py, PyAny>>,
        ffn_sub_norm: Option<&Bound<'py, PyAny>>,
        attn_mhc: MhcArgs<'py>,
        ffn_mhc: MhcArgs<'py>,
    ) -> PyResult<Self> {
        let parts = decode::LayerParts {
            attn_norm: read_array::<f32>("attn_norm", attn_norm, &[1], "float32")?.data,
            qkv: qkv.get().inner.clone(),
            o: o.get().inner.clone(),
            attn_sub_norm: read_vec("attn_sub_norm", attn_sub_norm)?,
            attn_mhc: read_mhc("attn_mhc", attn_mhc)?,
            ffn_norm: read_array::<f32>("ffn_norm", ffn_norm, &[1], "float32")?.data,
            gate_up: gate_up.get().inner.clone(),
            down: down.get().inner.clone(),
            ffn_sub_norm: read_vec("ffn_sub_norm", ffn_sub_norm)?,
            ffn_mhc: read_mhc("ffn_mhc", ffn_mhc)?,
            n_heads,
            n_kv_heads,
            eps,
            scale,
        };
        Ok(PyDecodeLayer { inner: Arc::new(decode::DecodeLayer::new(parts)?) })
    }

    /// Run the layer for B new tokens, in place on xs float32 [n_streams, B, D]: cos/sin [B, hd] are the
    /// tokens' RoPE rows; k_caches/v_caches hold one [KVH, capacity, hd] array per sequence (this layer's
    /// cache; the new k and v are written at positions[i], attention covers 0..=positions[i]).
    #[allow(clippy::too_many_arguments)]
    fn step<'py>(
        &self,
        py: Python<'py>,
        xs: &Bound<'py, PyAny>,
        cos: &Bound<'py, PyAny>,
        sin: &Bound<'py, PyAny>,
        k_caches: Vec<Bound<'py, PyAny>>,
        v_caches: Vec<Bound<'py, PyAny>>,
        positions: Vec<i64>,
    ) -> PyResult<()> {
        let layer = &self.inner;
        let mut a = step_args(layer, &[layer.n_kv_heads()], xs, cos, sin, &k_caches, &v_caches, &positions)?;
        let ex = exec()?;
        let (xs, rope, mut caches) = a.views()?;
        py.detach(|| rayon::scope(|_| layer.step(xs, &rope, &mut caches, ex)))?; // on a pool thread, as DecodeModel
        Ok(())
    }
}

/// Every layer's decode step, the stream mean, the output norm and the int8 head: one call per step.
///
/// Args:
///     layers: the DecodeLayer of each layer, in order.  output_norm: float32 [D].  head: Int8Matrix [V, D].
#[pyclass(name = "DecodeModel", module = "nanochat._ternary", frozen)]
pub struct PyDecodeModel {
    inner: Arc<decode::DecodeModel>,
}

#[pymethods]
impl PyDecodeModel {
    #[new]
    fn new(
        layers: Vec<Bound<'_, PyDecodeLayer>>,
        output_norm: &Bound<'_, PyAny>,
        head: &Bound<'_, PyInt8Matrix>,
    ) -> PyResult<Self> {
        let layers = layers.iter().map(|l| l.get().inner.clone()).collect();
        let output_norm = read_array::<f32>("output_norm", output_norm, &[1], "float32")?.data;
        let model = decode::DecodeModel::new(layers, output_norm, head.get().inner.clone())?;
        Ok(PyDecodeModel { inner: Arc::new(model) })
    }

    /// One decode step for B sequences: xs float32 [n_streams, B, D] (the new tokens' embeddings in every
    /// stream; overwritten), cos/sin [B, hd], one [L, KVH, capacity, hd] k and v cache per sequence, the
    /// new tokens' positions -> logits float32 [B, V].
    #[allow(clippy::too_many_arguments)]
    fn step<'py>(
        &self,
        py: Python<'py>,
        xs: &Bound<'py, PyAny>,
        cos: &Bound<'py, PyAny>,
        sin: &Bound<'py, PyAny>,
        k_caches: Vec<Bound<'py, PyAny>>,
        v_caches: Vec<Bound<'py, PyAny>>,
        positions: Vec<i64>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let model = &self.inner;
        let first = &model.layers()[0];
        let lead = [model.layers().len(), first.n_kv_heads()];
        let mut a = step_args(first, &lead, xs, cos, sin, &k_caches, &v_caches, &positions)?;
        let ex = exec()?;
        let (xs, rope, mut caches) = a.views()?;
        let b = caches.len();
        let logits = py.detach(|| model.step(xs, &rope, &mut caches, ex))?;
        to_2d(py, logits, b, model.vocab())
    }

    /// Seconds spent in each stage of the steps so far (qkv, attention, o, gate_up, down, head, and the
    /// norms/mHC/SiLU between them), summed over layers: the native share of decode time.
    fn times(&self) -> Vec<(&'static str, f64)> {
        decode::STAGES.iter().copied().zip(self.inner.seconds()).collect()
    }

    fn reset_times(&self) {
        self.inner.reset_times();
    }
}

/// The same matrices (TernaryMatrix and Int8Matrix objects, in any order), returned in that order as
/// new objects whose weights share mappings advised for transparent huge pages: a loaded model's
/// matrices all at once, so a decode step's weights span few TLB entries. Results are unchanged.
#[pyfunction]
fn share_weight_pages<'py>(py: Python<'py>, matrices: Vec<Bound<'py, PyAny>>) -> PyResult<Vec<Bound<'py, PyAny>>> {
    let (mut ternary, mut int8) = (Vec::new(), Vec::new());
    for (i, m) in matrices.iter().enumerate() {
        if let Ok(t) = m.cast::<PyTernaryMatrix>() {
            ternary.push(t.get().inner.clone());
        } else if let Ok(q) = m.cast::<PyInt8Matrix>() {
            int8.push(q.get().inner.clone());
        } else {
            return Err(Error::WrongType {
                arg: "matrices",
                msg: format!("item {i}: expected a TernaryMatrix or an Int8Matrix, got {}", m.get_type().name()?),
            }
            .into());
        }
    }
    let pool = pool::global()?;
    let (t_shared, q_shared) = py.detach(|| {
        let t: Vec<&PackedTernary> = ternary.iter().map(|m| &**m).collect();
        let q: Vec<&PackedInt8> = int8.iter().map(|m| &**m).collect();
        matmul::share_weight_pages(&t, &q, &pool)
    })?;
    let (mut t_iter, mut q_iter) = (t_shared.into_iter(), q_shared.into_iter());
    matrices
        .iter()
        .map(|m| {
            if m.cast::<PyTernaryMatrix>().is_ok() {
                let inner = Arc::new(t_iter.next().expect("one shared matrix per input"));
                Ok(Bound::new(py, PyTernaryMatrix { inner })?.into_any())
            } else {
                let inner = Arc::new(q_iter.next().expect("one shared matrix per input"));
                Ok(Bound::new(py, PyInt8Matrix { inner })?.into_any())
            }
        })
        .collect()
}

/// The kernel path in use: "avx512vnni", "avx512bw", "avx2" or "scalar" (NANOCHAT_TERNARY_ISA forces one).
#[pyfunction]
fn active_isa() -> PyResult<&'static str> {
    Ok(kernels::active_isa()?.name())
}

/// Use `n` pinned threads from now on (n >= 1).
#[pyfunction]
fn set_num_threads(py: Python<'_>, n: i64) -> PyResult<()> {
    if n < 1 {
        return Err(invalid("n", format!("expected a thread count >= 1, got {n}")).into());
    }
    py.detach(|| pool::set_global_threads(n as usize))?;
    Ok(())
}

/// The number of threads the kernels use (NANOCHAT_THREADS or every CPU unless set).
#[pyfunction]
fn num_threads() -> PyResult<usize> {
    Ok(pool::global()?.threads())
}

#[pymodule]
fn _ternary(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTernaryMatrix>()?;
    m.add_class::<PyInt8Matrix>()?;
    m.add_class::<PyDecodeLayer>()?;
    m.add_class::<PyDecodeModel>()?;
    m.add_function(wrap_pyfunction!(quantize_activations, m)?)?;
    m.add_function(wrap_pyfunction!(active_isa, m)?)?;
    m.add_function(wrap_pyfunction!(rms_norm, m)?)?;
    m.add_function(wrap_pyfunction!(silu_mul, m)?)?;
    m.add_function(wrap_pyfunction!(attend_decode, m)?)?;
    m.add_function(wrap_pyfunction!(attend_prefill, m)?)?;
    m.add_function(wrap_pyfunction!(mhc_read, m)?)?;
    m.add_function(wrap_pyfunction!(mhc_write, m)?)?;
    m.add_function(wrap_pyfunction!(rope_rows, m)?)?;
    m.add_function(wrap_pyfunction!(causal_softmax, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(share_weight_pages, m)?)?;
    Ok(())
}
