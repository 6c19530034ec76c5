"""Triton quantization kernels vs the PyTorch reference in nanochat.quant, on CPU via TRITON_INTERPRET=1.

Compared exactly (not within a tolerance): ternary codes, group scales, int8 activation codes and
scales, fake-quantized outputs (the reference's fp32 values cast to the output dtype, so "within
fp16 rounding" holds with zero error), STE gradients. Also: ties at .5 built from exact values,
short last groups, N=1, all-zero groups, huge / tiny / subnormal magnitudes, NaN / inf (the rule in
quant.py's docstring), non-contiguous input, autocast output dtype, bad arguments.
Run: .venv/bin/python -m pytest tests/test_triton_kernels.py -q
"""

import os
import subprocess
import sys

import pytest
import torch

from nanochat import quant

# triton.jit picks interpreted or compiled when the kernels are defined (and triton re-checks the
# flag at call time): set it for this module's import and tests only, so other modules are unaffected
_SAVED_INTERPRET = os.environ.get("TRITON_INTERPRET")


def _restore_interpret_flag() -> None:
    if _SAVED_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _SAVED_INTERPRET


os.environ["TRITON_INTERPRET"] = "1"
import triton_kernels as tk  # noqa: E402

_restore_interpret_flag()
assert tk.INTERPRET, ("triton_kernels was imported (compiled) before this test module could set "
                      "TRITON_INTERPRET=1; import it lazily in other test modules")


@pytest.fixture(autouse=True, scope="module")
def interpret_flag():
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    _restore_interpret_flag()


METHODS = ("absmean", "absmax")
# (N, K, group): exact multiples, short last groups, N=1, K smaller than one group
WEIGHT_SHAPES = [(1, 64, 64), (5, 300, 128), (33, 512, 256), (17, 200, 64), (3, 129, 128), (2, 40, 128)]


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Equal dtype, shape, NaN positions and values (IEEE ==, so -0 == +0)."""
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    nan_got, nan_want = torch.isnan(got), torch.isnan(want)
    assert torch.equal(nan_got, nan_want), f"{what}: NaN at {nan_got.sum()} vs {nan_want.sum()} positions"
    diff = got[~nan_got] != want[~nan_want]
    if diff.any():
        g, w = got[~nan_got][diff], want[~nan_want][diff]
        pytest.fail(f"{what}: {int(diff.sum())} of {got.numel()} differ, e.g. got {g[:4].tolist()} want {w[:4].tolist()}")


def check_weight(w: torch.Tensor, group: int, method: str, out_dtype=torch.float32) -> None:
    wq, scales, codes = tk.weight_quant(w, group, method, out_dtype=out_dtype, return_codes=True)
    codes_ref, scales_ref = quant.weight_scales_codes_ref(w, group, method)
    assert_same(codes, codes_ref, f"codes {method} {tuple(w.shape)}/{group}")
    assert_same(scales, scales_ref, f"scales {method} {tuple(w.shape)}/{group}")
    assert_same(wq, quant.weight_quant_ref(w.float(), group, method).to(out_dtype), f"w_q {method} {out_dtype}")


def check_act(x: torch.Tensor, out_dtype=None) -> None:
    xq, q, s = tk.act_quant(x, return_int8=True, out_dtype=out_dtype)
    q_ref, s_ref = quant.act_quant_int8_ref(x)
    assert_same(q, q_ref, f"act q {tuple(x.shape)}")
    assert_same(s, s_ref, f"act s {tuple(x.shape)}")
    assert_same(xq, quant.act_quant_ref(x).to(out_dtype or x.dtype), f"act x_q {tuple(x.shape)} {out_dtype}")


# ---------------------------------------------------------------------------------------------
# Weights

@pytest.mark.parametrize("n,k,group", WEIGHT_SHAPES)
@pytest.mark.parametrize("method", METHODS)
def test_weight_matches_reference(n, k, group, method):
    torch.manual_seed(n * 1000 + k)
    w = torch.randn(n, k) * 0.02
    w[0, : k // 3] *= 50  # groups of very different scale in one row
    check_weight(w, group, method)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_weight_output_dtypes(out_dtype):
    torch.manual_seed(1)
    check_weight(torch.randn(6, 320) * 0.05, 64, "absmean", out_dtype)
    check_weight(torch.randn(6, 320) * 0.05, 128, "absmax", out_dtype)


@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_weight_other_input_dtypes(in_dtype):
    torch.manual_seed(2)
    w = (torch.randn(4, 256) * 0.05).to(in_dtype)
    wq, _, _ = tk.weight_quant(w, 128, "absmean")
    assert_same(wq, quant.weight_quant_ref(w, 128, "absmean"), f"w_q from {in_dtype}")


def test_weight_ties_round_half_to_even():
    # absmean of |[0.5, 1.5, -0.5, -1.5] * 16| is exactly 1, so w / scale lands exactly on .5 ties
    row = torch.tensor([0.5, 1.5, -0.5, -1.5]).repeat(16)
    w = torch.stack([row, row * 2.0**-10, row.flip(0)])
    check_weight(w, 64, "absmean")
    codes, scales = tk.weight_scales_codes(w, 64, "absmean")
    assert torch.equal(scales, torch.tensor([[1.0], [2.0**-10], [1.0]]))
    # 0.5 -> 0 (even), 1.5 -> 2 -> clamped to 1; half-away-from-zero would give 1 for 0.5
    assert codes[0, :4].tolist() == [0, 1, 0, -1]
    # absmax: max 2.0, so 1.0 / 2.0 = 0.5 is a tie -> 0, and the max itself -> 1
    w = torch.zeros(1, 128)
    w[0, :4] = torch.tensor([2.0, 1.0, -1.0, 1.0000001])
    check_weight(w, 128, "absmax")
    codes, _ = tk.weight_scales_codes(w, 128, "absmax")
    assert codes[0, :4].tolist() == [1, 0, 0, 1]


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # numpy, for 3e38 -> fp16 inf
def test_weight_zero_groups_and_magnitudes():
    w = torch.randn(4, 384)
    w[0] = 0.0  # all-zero row: scale = EPS, codes 0, w_q 0
    w[1, 128:256] = 3e38 * torch.sign(torch.randn(128))  # huge: an fp32 sum would overflow
    w[2, :128] = 1e-40 * torch.sign(torch.randn(128))  # subnormal
    w[3, 256:] = torch.randn(128) * 1e-30  # tiny: below EPS
    for method in METHODS:
        check_weight(w, 128, method)
        check_weight(w, 128, method, torch.float16)  # huge values become inf in fp16, as in the reference
        wq, scales, codes = tk.weight_quant(w, 128, method, return_codes=True)
        assert torch.isfinite(scales).all() and torch.isfinite(wq).all()
        assert (scales[0] == torch.tensor(quant.EPS)).all() and (codes[0] == 0).all() and (wq[0] == 0).all()
        assert scales[1, 1] == 3e38 and (codes[1, 128:256].abs() == 1).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy, for the NaN arithmetic
def test_weight_non_finite_groups_are_nan():
    torch.manual_seed(3)
    w = torch.randn(3, 300) * 0.02
    w[0, 5] = float("nan")
    w[1, 130] = float("inf")
    w[2, 299] = -float("inf")  # in the short last group
    for method in METHODS:
        check_weight(w, 128, method)
        wq, scales, codes = tk.weight_quant(w, 128, method, return_codes=True)
        bad = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.bool)
        assert torch.equal(torch.isnan(scales), bad)
        assert (codes[0, :128] == 0).all() and torch.isnan(wq[0, :128]).all()
        assert torch.isfinite(wq[0, 128:]).all()  # other groups of the row are untouched


def test_weight_non_contiguous_rows():
    torch.manual_seed(4)
    base = torch.randn(6, 400) * 0.02
    check_weight(base[:, 10:266], 128, "absmean")  # row stride 400
    check_weight(base.t().contiguous().t()[:, :192], 64, "absmax")  # column-major: copied first


def test_weight_bad_arguments():
    w = torch.randn(4, 128)
    with pytest.raises(ValueError, match="group_size.*64, 128, 256.*got 100"):
        tk.weight_quant(w, 100)
    with pytest.raises(ValueError, match="method.*got 'mean'"):
        tk.weight_quant(w, 128, "mean")
    with pytest.raises(ValueError, match="2-D.*got shape \\(512,\\)"):
        tk.weight_quant(w.flatten(), 128)
    with pytest.raises(TypeError, match="floating-point.*torch.int32"):
        tk.weight_quant(w.int(), 128)
    with pytest.raises(ValueError, match="out_dtype"):
        tk.weight_quant(w, 128, out_dtype=torch.int8)
    with pytest.raises(ValueError, match="clip_factor.*got -1"):
        tk.weight_quant_ste(w, 128, clip_factor=-1.0)


# ---------------------------------------------------------------------------------------------
# Activations

@pytest.mark.parametrize("shape", [(1, 1), (300, 8), (2, 3, 768), (7, 5000), (4, 4096), (0, 8)])
def test_act_matches_reference(shape):
    torch.manual_seed(sum(shape))
    x = torch.randn(shape) * 3
    check_act(x)
    check_act(x, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_act_input_dtypes(dtype):
    torch.manual_seed(5)
    check_act((torch.randn(5, 96) * 2).to(dtype))


def test_act_ties_and_magnitudes():
    # absmax 127 makes s exactly 1, so x * s lands exactly on .5 ties
    x = torch.zeros(5, 64)
    x[0, :6] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5])
    x[1] = 0.0  # all-zero token
    x[2, :4] = torch.tensor([3e38, -3e38, 1.0, 1e38])  # huge
    x[3, :3] = torch.tensor([1e-40, -2e-40, 5e-41])  # subnormal: absmax clamps to EPS
    x[4] = torch.randn(64) * 1e-30
    check_act(x)
    _, q, s = tk.act_quant(x, return_int8=True)
    assert s[0, 0] == 1.0 and q[0, :6].tolist() == [127, 0, 2, 2, 0, -2]
    assert (q[1] == 0).all() and (q[3] == 0).all() and q[2, :2].tolist() == [127, -127]


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_act_non_finite_tokens_are_nan():
    torch.manual_seed(6)
    x = torch.randn(4, 5000)
    x[0, 17] = float("nan")
    x[1, 4999] = float("inf")  # in the second chunk of the row
    x[2, 0] = -float("inf")
    check_act(x)
    xq, q, s = tk.act_quant(x, return_int8=True)
    assert torch.isnan(s[:3]).all() and torch.isfinite(s[3]).all()
    assert (q[:3] == 0).all() and torch.isnan(xq[:3]).all() and torch.isfinite(xq[3]).all()


def test_act_non_contiguous_and_bad_arguments():
    torch.manual_seed(7)
    check_act((torch.randn(64, 6) * 2).t())
    with pytest.raises(TypeError, match="floating-point"):
        tk.act_quant(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="K > 0.*got shape \\(\\)"):
        tk.act_quant(torch.tensor(1.0))
    with pytest.raises(ValueError, match="K > 0.*got shape \\(3, 0\\)"):
        tk.act_quant(torch.ones(3, 0))


# ---------------------------------------------------------------------------------------------
# Straight-through estimator (autograd Functions vs the reference path of quant.py)

def reference_weight_ste(w, group, method):
    assert not w.is_cuda  # quant.py dispatches CPU tensors to its PyTorch reference
    return quant.quantize_weight(w, group, method)


def reference_act_ste(x):
    assert not x.is_cuda
    return quant.quantize_activation(x, 8)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_weight_ste_gradient(method, out_dtype):
    torch.manual_seed(8)
    w = (torch.randn(9, 200) * 0.02).requires_grad_()
    w_ref = w.detach().clone().requires_grad_()
    r = torch.randn(9, 200)
    y = tk.weight_quant_ste(w, 64, method, out_dtype=out_dtype)
    y_ref = reference_weight_ste(w_ref, 64, method).to(out_dtype)
    assert_same(y.detach(), y_ref.detach(), "forward")
    (y.float() * r).sum().backward()
    (y_ref.float() * r).sum().backward()
    assert w.grad.dtype == torch.float32
    assert_same(w.grad, w_ref.grad, "STE gradient")


def test_act_ste_gradient():
    torch.manual_seed(9)
    x = (torch.randn(2, 5, 96) * 2).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    r = torch.randn(2, 5, 96)
    y, y_ref = tk.act_quant_ste(x), reference_act_ste(x_ref)
    assert_same(y.detach(), y_ref.detach(), "forward")
    (y * r).sum().backward()
    (y_ref * r).sum().backward()
    assert_same(x.grad, x_ref.grad, "STE gradient")


def test_ste_jacobians_float64():
    # gradcheck-style: the full Jacobian of each Function equals the reference path's (identity);
    # finite differences are useless here because fake quantization is piecewise constant
    torch.manual_seed(10)
    w = torch.randn(2, 96, dtype=torch.float64) * 0.02
    jac = torch.autograd.functional.jacobian(lambda t: tk.weight_quant_ste(t, 64, "absmean"), w)
    jac_ref = torch.autograd.functional.jacobian(lambda t: reference_weight_ste(t, 64, "absmean"), w)
    assert_same(jac, jac_ref, "weight Jacobian")
    x = torch.randn(3, 40, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(tk.act_quant_ste, x)
    assert_same(jac, torch.autograd.functional.jacobian(reference_act_ste, x), "activation Jacobian")


def test_clipped_ste_gradient():
    torch.manual_seed(11)
    w = torch.randn(5, 300) * 0.02
    w[0, :10] *= 40  # far outside their group's range: gradient clipped
    w[1, 3] = float("nan")  # NaN group: scale NaN, whole group gets no gradient
    w = w.requires_grad_()
    r = torch.randn(5, 300)
    clip = 2.0
    (tk.weight_quant_ste(w, 128, "absmean", out_dtype=torch.float16, clip_factor=clip).float() * r).sum().backward()
    _, scales = quant.weight_scales_codes_ref(w.detach(), 128, "absmean")
    limit = (clip * scales).repeat_interleave(128, dim=1)[:, :300]
    want = torch.where(w.detach().abs() <= limit, r.half().float(), 0.0)
    assert_same(w.grad, want, "clipped STE gradient")
    assert (w.grad[0, :10] == 0).all() and (w.grad[1, :128] == 0).all() and (w.grad[1, 128:] != 0).any()


def test_autocast_output_dtype():
    torch.manual_seed(12)
    w, x = torch.randn(4, 128) * 0.02, torch.randn(3, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        wq, xq = tk.weight_quant_ste(w, 128), tk.act_quant_ste(x)
    assert_same(wq, quant.weight_quant_ref(w, 128).to(torch.bfloat16), "autocast weight")
    assert_same(xq, quant.act_quant_ref(x).to(torch.bfloat16), "autocast activation")


# ---------------------------------------------------------------------------------------------
# The GPU lowering (never seen by the interpreter): compile for sm_90 without a GPU, inspect the PTX

def run_compiled(*argv: str) -> subprocess.CompletedProcess:
    """Run a command in a fresh Python with the kernels compiled (not interpreted)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "python"), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, *argv], cwd=root, env=env, capture_output=True, text=True, timeout=600)


# ---------------------------------------------------------------------------------------------
# mHC stream mixing (triton_kernels/stream_mix.py): fp32 sums of 2-4 products, compared within rounding

@pytest.mark.parametrize("m,n,shape", [(2, 2, (3, 5, 8)), (4, 4, (2, 700, 6)), (1, 4, (5000,)), (1, 2, (1, 1, 4))])
def test_stream_mix_matches_reference_and_its_gradients(m, n, shape):
    from triton_kernels.stream_mix import stream_mix, stream_mix_ref
    torch.manual_seed(m * 10 + n)
    w = torch.randn(m, n, requires_grad=True)
    xs = torch.randn(n, *shape, requires_grad=True)
    g = torch.randn(m, *shape)
    out = stream_mix(w, xs)
    torch.testing.assert_close(out, stream_mix_ref(w, xs))
    gw, gx = torch.autograd.grad(out, (w, xs), g)
    rw, rx = torch.autograd.grad(stream_mix_ref(w, xs), (w, xs), g)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-4)  # a sum over every position, in another order


def test_stream_mix_expanded_streams_and_bad_arguments():
    from triton_kernels.stream_mix import stream_mix, stream_mix_ref
    x = torch.randn(4, 9, 16)
    xs = x.unsqueeze(0).expand(2, *x.shape)  # the first block's streams: one embedding, stride 0
    w = torch.tensor([[0.9, 0.1], [0.1, 0.9]])
    torch.testing.assert_close(stream_mix(w, xs), stream_mix_ref(w, xs))
    with pytest.raises(TypeError, match="float32"):
        stream_mix(w.double(), xs.double())
    with pytest.raises(ValueError, match="n 2 or 4"):
        stream_mix(torch.ones(3, 3), torch.ones(3, 4, 8))


def test_kernels_compile_for_sm90_with_exact_arithmetic():
    from triton_kernels.ptx_check import problems
    assert problems("\tfma.rn.f32 %r1, %r2, %r3, %r4;") and problems("div.full.f32 %r1") and problems("0f4B400000")
    run = run_compiled("-m", "triton_kernels.ptx_check")
    assert run.returncode == 0, f"ptx_check failed:\n{run.stdout}\n{run.stderr[-3000:]}"
    assert run.stdout.count("sm_90 ok") == 7, run.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_kernels_match_reference_on_gpu():
    # the benchmark's exactness gate alone: every preset shape, ties, zero and NaN groups, on CUDA
    run = run_compiled("benches/bench_triton.py", "--skip-kernels", "--skip-train", "--presets", "nano-125m")
    assert run.returncode == 0, f"GPU exactness check failed:\n{run.stdout}\n{run.stderr[-3000:]}"


def test_torch_compile_full_graph():
    # the kernels are opaque custom ops to torch.compile: one graph, same values and gradients as eager
    torch.manual_seed(13)

    def layer(w, x):
        return torch.nn.functional.linear(tk.act_quant_ste(x), tk.weight_quant_ste(w, 64, clip_factor=2.0))

    w, x = (torch.randn(8, 128) * 0.02).requires_grad_(), torch.randn(3, 128).requires_grad_()
    r = torch.randn(3, 8)
    (layer(w, x) * r).sum().backward()
    grads = w.grad.clone(), x.grad.clone()
    w.grad = x.grad = None
    torch._dynamo.reset()
    out = torch.compile(layer, backend="aot_eager", fullgraph=True)(w, x)
    (out * r).sum().backward()
    assert_same(out.detach(), layer(w, x).detach(), "compiled forward")
    assert_same(w.grad, grads[0], "compiled weight gradient")
    assert_same(x.grad, grads[1], "compiled activation gradient")
