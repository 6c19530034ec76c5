//! The `nanochat._ternary` Python module: validation at the boundary, then the GIL is released.
//!
//! Inputs are checked (type, dtype, ndim, shape, C-contiguity, values) and copied into owned Rust
//! buffers while holding the GIL; packing and every GEMV/GEMM run detached from it. Outputs are
//! numpy arrays that take ownership of the result vectors (no copy). Errors map through error.rs.

use std::sync::Arc;

use numpy::ndarray::Array2;
use numpy::{
    dtype, Element, IntoPyArray, PyArray1, PyArray2, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::prelude::*;

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

fn read_array<T: Element + Copy>(
    arg: &'static str,
    obj: &Bound<'_, PyAny>,
    ndims: &[usize],
    dtype_name: &str,
) -> Result<Owned<T>> {
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
    layer_ops::rms_norm(slice_of("x", &x)?, slice_of("weight", &weight)?, eps, &mut out)?;
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
    layer_ops::silu_mul(slice_of("gu", &gu)?, f, &mut out)?;
    to_2d(py, out, shape[0], f)
}

/// One decode step of attention for one sequence: RoPE on q and k of qkv [q | k | v] (float32
/// [(H + 2 KVH) hd]) with full-width cos/sin [hd], k and v written into k_cache/v_cache [KVH, capacity,
/// hd] at pos, softmax attention of each query head over positions 0..=pos -> float32 [H hd].
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn attend_decode<'py>(
    py: Python<'py>,
    qkv: numpy::PyReadonlyArrayDyn<'py, f32>,
    cos: numpy::PyReadonlyArrayDyn<'py, f32>,
    sin: numpy::PyReadonlyArrayDyn<'py, f32>,
    mut k_cache: numpy::PyReadwriteArrayDyn<'py, f32>,
    mut v_cache: numpy::PyReadwriteArrayDyn<'py, f32>,
    pos: usize,
    n_heads: usize,
    scale: f32,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let cs = k_cache.shape().to_vec();
    if cs.len() != 3 || v_cache.shape() != cs.as_slice() {
        return Err(invalid(
            "k_cache",
            format!("expected two [KVH, capacity, hd] caches, got {cs:?} and {:?}", v_cache.shape()),
        )
        .into());
    }
    let shape = layer_ops::AttnShape { n_heads, n_kv_heads: cs[0], head_dim: cs[2], capacity: cs[1] };
    let mut out = vec![0f32; n_heads * cs[2]];
    let kc = k_cache.as_slice_mut().map_err(|_| invalid("k_cache", "not C-contiguous"))?;
    let vc = v_cache.as_slice_mut().map_err(|_| invalid("v_cache", "not C-contiguous"))?;
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
    m.add_function(wrap_pyfunction!(quantize_activations, m)?)?;
    m.add_function(wrap_pyfunction!(active_isa, m)?)?;
    m.add_function(wrap_pyfunction!(rms_norm, m)?)?;
    m.add_function(wrap_pyfunction!(silu_mul, m)?)?;
    m.add_function(wrap_pyfunction!(attend_decode, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    Ok(())
}
