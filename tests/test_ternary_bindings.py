"""Tests of the Rust kernels' Python bindings (nanochat.ternary) against a numpy reference.

The reference is the arithmetic of python/nanochat/quant.py and docs/contracts.md:
    s = 127 / max(max|x|, 1e-5),  q = clamp(round_half_even(x * s), -128, 127)
    y[m] = sum_g scale[m, g] * sum_{k in g} code[m, k] * q[k] / s
computed in float64 from the same int8 q, so the only differences are f32 rounding in the kernel.
Every kernel path this CPU has is also run in a subprocess (NANOCHAT_TERNARY_ISA) and compared.

Run: .venv/bin/python -m pytest tests/test_ternary_bindings.py -q
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ternary = pytest.importorskip("nanochat.ternary", reason="build the extension: maturin develop --release")
from nanochat.ternary import (Int8Matrix, TernaryMatrix, active_isa, num_threads, quantize_activations,  # noqa: E402
                              set_num_threads, share_weight_pages)

RNG = np.random.default_rng(1234)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def np_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The activation rule in float32 numpy: (q int8 [T, K], s float32 [T])."""
    x = np.atleast_2d(x).astype(np.float32)
    absmax = np.abs(x).max(axis=1)
    s = np.float32(127.0) / np.maximum(absmax, np.float32(1e-5))
    q = np.clip(np.round(x * s[:, None]), -128, 127).astype(np.int8)
    return q, s.astype(np.float32)


def np_ternary(codes, scales, group_size, x):
    """float64 reference of TernaryMatrix.gemm."""
    q, s = np_quantize(x)
    k = codes.shape[1]
    w = codes.astype(np.float64) * np.repeat(scales.astype(np.float64), group_size, axis=1)[:, :k]
    return (q.astype(np.float64) @ w.T) / s[:, None].astype(np.float64)


def random_ternary(m, k, group_size):
    codes = RNG.integers(-1, 2, size=(m, k)).astype(np.int8)
    scales = RNG.uniform(0.01, 0.1, size=(m, -(-k // group_size))).astype(np.float32)
    return codes, scales


def assert_close(y, ref, what):
    err = np.abs(y.astype(np.float64) - ref).max()
    bound = 1e-5 * (np.abs(ref).max() + 1.0)
    assert err <= bound, f"{what}: max abs diff {err:.3g} > {bound:.3g}"


# ---------------------------------------------------------------------------------------------
# Activation quantization

def test_quantize_activations_matches_numpy_and_torch():
    x = RNG.standard_normal((5, 300)).astype(np.float32) * np.float32(3.0)
    x[1, 7] = 0.5 * np.abs(x[1]).max()  # a .5 tie after scaling is possible: round half to even
    q, s = quantize_activations(x)
    q_ref, s_ref = np_quantize(x)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(s, s_ref)
    torch = pytest.importorskip("torch")
    from nanochat.quant import act_quant_int8_ref
    tq, ts = act_quant_int8_ref(torch.from_numpy(x))
    np.testing.assert_array_equal(q, tq.numpy())
    np.testing.assert_array_equal(s, ts.numpy()[:, 0])


def test_quantize_activations_1d_and_special_tokens():
    q, s = quantize_activations(np.array([0.5, -1.0, 0.25, 0.0], dtype=np.float32))
    assert q.tolist() == [64, -127, 32, 0] and s.shape == (1,) and s[0] == 127.0
    q, s = quantize_activations(np.array([[0.0, 0.0], [1.0, np.nan], [np.inf, 1.0]], dtype=np.float32))
    assert q.tolist() == [[0, 0], [0, 0], [0, 0]]
    assert s[0] == np.float32(127.0) / np.float32(1e-5) and np.isnan(s[1]) and np.isnan(s[2])


# ---------------------------------------------------------------------------------------------
# TernaryMatrix

@pytest.mark.parametrize("m,k,group_size", [(1, 1, 64), (7, 100, 64), (70, 300, 128), (33, 768, 256), (130, 1000, 128)])
def test_ternary_gemv_gemm_match_reference(m, k, group_size):
    codes, scales = random_ternary(m, k, group_size)
    w = TernaryMatrix(codes, scales, group_size)
    assert (w.rows, w.cols, w.group_size) == (m, k, group_size)
    assert w.nbytes >= m * k // 4
    x = RNG.standard_normal((9, k)).astype(np.float32)
    y = w.gemm(x)
    assert y.shape == (9, m) and y.dtype == np.float32
    assert_close(y, np_ternary(codes, scales, group_size, x), f"gemm {m}x{k} g{group_size}")
    for t in (0, 8):
        # One token through gemv gives the same bits as its row of gemm.
        np.testing.assert_array_equal(w.gemv(x[t]), y[t])


def test_ternary_unpack_round_trip():
    codes, scales = random_ternary(13, 333, 64)
    c, s = TernaryMatrix(codes, scales, 64).unpack()
    np.testing.assert_array_equal(c, codes)
    np.testing.assert_array_equal(s, scales)
    assert c.dtype == np.int8 and s.dtype == np.float32


def test_ternary_power_of_two_scales_are_exact():
    # With scales 2^j and small K every partial sum is exact in f32, so the kernel must equal the
    # reference exactly whatever order it adds in.
    codes = RNG.integers(-1, 2, size=(21, 517)).astype(np.int8)
    scales = (2.0 ** RNG.integers(-3, 3, size=(21, 5))).astype(np.float32)
    x = RNG.standard_normal((3, 517)).astype(np.float32)
    q, s = np_quantize(x)
    w = codes.astype(np.float64) * np.repeat(scales, 128, axis=1)[:, :517]
    exact = ((q.astype(np.float64) @ w.T).astype(np.float32) / s[:, None])
    np.testing.assert_array_equal(TernaryMatrix(codes, scales, 128).gemm(x), exact)


def test_ternary_non_finite_token_gives_nan_row_only():
    codes, scales = random_ternary(8, 64, 64)
    x = RNG.standard_normal((2, 64)).astype(np.float32)
    x[1, 3] = np.nan
    y = TernaryMatrix(codes, scales, 64).gemm(x)
    assert np.isfinite(y[0]).all() and np.isnan(y[1]).all()


def test_threads_give_identical_results():
    codes, scales = random_ternary(1024, 1536, 128)  # above the single-thread cut-off
    w = TernaryMatrix(codes, scales, 128)
    x = RNG.standard_normal((2, 1536)).astype(np.float32)
    before = num_threads()
    try:
        set_num_threads(1)
        assert num_threads() == 1
        one = w.gemm(x)
        set_num_threads(2)
        assert num_threads() == 2
        np.testing.assert_array_equal(w.gemm(x), one)
        np.testing.assert_array_equal(TernaryMatrix(codes, scales, 128).gemm(x), one)
    finally:
        set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# Int8Matrix

def test_int8_from_f32_and_matmul():
    w = RNG.standard_normal((37, 200)).astype(np.float32)
    w[5] = 0.0
    m = Int8Matrix.from_f32(w)
    q, scales = m.unpack()
    scale_ref = np.abs(w).max(axis=1) / np.float32(127.0)
    np.testing.assert_array_equal(scales, np.where(scale_ref > 0, scale_ref, 0).astype(np.float32))
    safe = np.where(scale_ref > 0, scale_ref, 1)[:, None]
    np.testing.assert_array_equal(q, np.round(w / safe).astype(np.int8))
    x = RNG.standard_normal((4, 200)).astype(np.float32)
    xq, s = np_quantize(x)
    ref = (xq.astype(np.float64) @ (q.astype(np.float64) * scales[:, None]).T) / s[:, None]
    y = m.gemm(x)
    assert y.shape == (4, 37)
    assert_close(y, ref, "int8 gemm")
    np.testing.assert_array_equal(m.gemv(x[2]), y[2])
    assert (m.rows, m.cols) == (37, 200)


def test_int8_from_q_and_scales():
    q = RNG.integers(-128, 128, size=(9, 70)).astype(np.int8)
    scales = RNG.uniform(0.001, 0.01, size=9).astype(np.float32)
    m = Int8Matrix(q, scales)
    q2, s2 = m.unpack()
    np.testing.assert_array_equal(q2, q)
    np.testing.assert_array_equal(s2, scales)
    x = RNG.standard_normal(70).astype(np.float32)
    xq, s = np_quantize(x)
    ref = (q.astype(np.float64) @ xq[0].astype(np.float64)) * scales / s[0]
    assert_close(m.gemv(x), ref, "int8 gemv")


def test_shared_weight_pages_keep_every_matrix_and_result():
    mats, xs = [], []
    for m, k in [(300, 200), (8, 1000), (64, 64)]:
        codes, scales = random_ternary(m, k, 64)
        mats.append(TernaryMatrix(codes, scales, 64))
        xs.append(RNG.standard_normal((3, k)).astype(np.float32))
    mats.insert(1, Int8Matrix.from_f32(RNG.standard_normal((50, 200)).astype(np.float32)))
    xs.insert(1, RNG.standard_normal((3, 200)).astype(np.float32))
    shared = share_weight_pages(mats)
    assert [type(m) for m in shared] == [type(m) for m in mats]
    for old, new, x in zip(mats, shared, xs):
        assert new is not old
        for a, b in zip(old.unpack(), new.unpack()):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(new.gemm(x), old.gemm(x))
        np.testing.assert_array_equal(new.gemv(x[0]), old.gemv(x[0]))
    assert share_weight_pages([]) == []
    with pytest.raises(TypeError, match="item 1: expected a TernaryMatrix or an Int8Matrix, got ndarray"):
        share_weight_pages([mats[0], np.zeros(3)])


# ---------------------------------------------------------------------------------------------
# Bad input: ValueError naming the argument (TypeError for a non-array)

def test_bad_input_errors():
    codes, scales = random_ternary(8, 128, 128)
    with pytest.raises(ValueError, match="codes: expected dtype int8"):
        TernaryMatrix(codes.astype(np.int32), scales, 128)
    with pytest.raises(ValueError, match="codes: expected a 2-D array"):
        TernaryMatrix(codes.ravel(), scales, 128)
    with pytest.raises(ValueError, match="codes: .*not C-contiguous"):
        TernaryMatrix(np.asfortranarray(codes), scales, 128)
    bad = codes.copy()
    bad[3, 5] = 2
    with pytest.raises(ValueError, match=r"codes: value 2 at \[3, 5\]"):
        TernaryMatrix(bad, scales, 128)
    with pytest.raises(ValueError, match=r"scales: expected shape \[8, 2\]"):
        TernaryMatrix(codes, scales, 64)
    with pytest.raises(ValueError, match="group_size: expected one of 64, 128, 256, got 100"):
        TernaryMatrix(codes, scales, 100)
    with pytest.raises(ValueError, match="scales: expected dtype float32"):
        TernaryMatrix(codes, scales.astype(np.float64), 128)
    with pytest.raises(TypeError, match="codes: expected a numpy.ndarray"):
        TernaryMatrix(codes.tolist(), scales, 128)
    w = TernaryMatrix(codes, scales, 128)
    with pytest.raises(ValueError, match="x: expected last dimension K = 128"):
        w.gemv(np.zeros(127, dtype=np.float32))
    with pytest.raises(ValueError, match="x: expected a 1-D array"):
        w.gemv(np.zeros((1, 128), dtype=np.float32))
    with pytest.raises(ValueError, match="x: expected a 2-D array"):
        w.gemm(np.zeros(128, dtype=np.float32))
    with pytest.raises(ValueError, match="x: expected dtype float32"):
        w.gemm(np.zeros((2, 128)))
    with pytest.raises(ValueError, match="x: .*not C-contiguous"):
        w.gemm(np.zeros((128, 2), dtype=np.float32).T)
    with pytest.raises(ValueError, match=r"scales: expected shape \[8\]"):
        Int8Matrix(codes, np.ones(7, dtype=np.float32))
    with pytest.raises(ValueError, match="w: non-finite value"):
        Int8Matrix.from_f32(np.array([[1.0, np.inf]], dtype=np.float32))
    with pytest.raises(ValueError, match="n: expected a thread count >= 1"):
        set_num_threads(0)


# ---------------------------------------------------------------------------------------------
# Every kernel path this CPU has gives the same results (subprocess per NANOCHAT_TERNARY_ISA)

CPU_FLAGS = set()
if os.path.exists("/proc/cpuinfo"):
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            CPU_FLAGS = set(line.split(":", 1)[1].split())
            break
NEEDS = {"scalar": [], "avx2": ["avx2", "fma"], "avx512bw": ["avx512f", "avx512bw", "avx512vl"],
         "avx512vnni": ["avx512f", "avx512bw", "avx512vl", "avx512_vnni"]}

CHILD = """
import json, sys, numpy as np
from nanochat.ternary import TernaryMatrix, Int8Matrix, active_isa
rng = np.random.default_rng(7)
out = {"isa": active_isa()}
for m, k, g in [(37, 700, 64), (64, 1280, 128), (9, 513, 256)]:
    codes = rng.integers(-1, 2, size=(m, k)).astype(np.int8)
    scales = rng.uniform(0.01, 0.1, size=(m, -(-k // g))).astype(np.float32)
    x = rng.standard_normal((5, k)).astype(np.float32)
    out[f"t{m}"] = TernaryMatrix(codes, scales, g).gemm(x).tolist()
    out[f"i{m}"] = Int8Matrix.from_f32(rng.standard_normal((m, k)).astype(np.float32)).gemm(x).tolist()
print(json.dumps(out))
"""


def run_child(isa):
    env = dict(os.environ, NANOCHAT_TERNARY_ISA=isa, PYTHONPATH=os.path.join(ROOT, "python"))
    res = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120)
    return res


@pytest.mark.parametrize("isa", ["avx2", "avx512bw", "avx512vnni"])
def test_each_isa_matches_scalar(isa):
    missing = [f for f in NEEDS[isa] if f not in CPU_FLAGS]
    if missing:
        pytest.skip(f"{isa}: this CPU lacks {', '.join(missing)}")
    scalar = run_child("scalar")
    assert scalar.returncode == 0, scalar.stderr
    fast = run_child(isa)
    assert fast.returncode == 0, fast.stderr
    a, b = json.loads(scalar.stdout), json.loads(fast.stdout)
    assert a.pop("isa") == "scalar" and b.pop("isa") == isa
    for key in a:
        ref = np.array(a[key], dtype=np.float64)
        if key.startswith("i"):
            # int8 head: exact integer dot, same float epilogue on every path
            np.testing.assert_array_equal(np.array(b[key]), ref, err_msg=f"{isa} {key}")
        else:
            assert_close(np.array(b[key]), ref, f"{isa} {key}")


def test_unknown_isa_is_an_error():
    res = run_child("avx9000")
    assert res.returncode != 0 and "NANOCHAT_TERNARY_ISA" in res.stderr


def test_active_isa_is_known():
    assert active_isa() in ("avx512vnni", "avx512bw", "avx2", "scalar")
