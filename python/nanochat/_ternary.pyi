"""Type stubs for the Rust extension `nanochat._ternary` (rust/ternary_kernels/src/py.rs).

Every call validates its arguments (ValueError naming the argument for a bad dtype, shape, layout or
value; TypeError for a non-ndarray) and releases the GIL while packing or multiplying.
"""

import numpy as np
import numpy.typing as npt

class TernaryMatrix:
    """W[m, k] = codes[m, k] * scales[m, k // group_size], packed 2 bits per weight (docs/packed-layout.md)."""

    def __init__(
        self,
        codes: npt.NDArray[np.int8],
        scales: npt.NDArray[np.float32],
        group_size: int = 128,
    ) -> None:
        """codes int8 [M, K] in {-1, 0, 1}; scales float32 [M, ceil(K / group_size)]; group_size 64, 128 or 256."""
    @property
    def rows(self) -> int:
        """M, the number of outputs."""
    @property
    def cols(self) -> int:
        """K, the number of inputs."""
    @property
    def group_size(self) -> int: ...
    @property
    def nbytes(self) -> int:
        """Bytes of packed codes and scales, padding included."""
    def gemv_dynamic(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """As gemv (same result bit for bit), rows in small chunks that idle threads steal."""
    def gemm_dynamic(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """As gemm (same result bit for bit), scheduled like gemv_dynamic."""
    def gemv(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """float32 [K] -> float32 [M]; x is quantized to int8 per token inside (nanochat.quant rule)."""
    def gemm(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """float32 [T, K] -> float32 [T, M]; row t equals gemv(x[t]) bit for bit."""
    def unpack(self) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
        """(codes int8 [M, K], scales float32 [M, G]) exactly as given."""

class Int8Matrix:
    """W[m, k] = q[m, k] * scales[m]: per-row int8 weights (e.g. the output head)."""

    def __init__(self, q: npt.NDArray[np.int8], scales: npt.NDArray[np.float32]) -> None:
        """q int8 [M, K]; scales float32 [M]."""
    @staticmethod
    def from_f32(w: npt.NDArray[np.float32]) -> Int8Matrix:
        """Per-row absmax: scale = max|w| / 127, q = round_half_even(w / scale); all-zero rows get scale 0."""
    @property
    def rows(self) -> int: ...
    @property
    def cols(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    def gemv_dynamic(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """As gemv (same result bit for bit), rows in small chunks that idle threads steal."""
    def gemm_dynamic(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """As gemm (same result bit for bit), scheduled like gemv_dynamic."""
    def gemv(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """float32 [K] -> float32 [M]."""
    def gemm(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """float32 [T, K] -> float32 [T, M]."""
    def unpack(self) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
        """(q int8 [M, K], scales float32 [M])."""

def quantize_activations(
    x: npt.NDArray[np.float32],
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
    """float32 [T, K] -> (q int8 [T, K], s float32 [T]); a 1-D [K] input gives (q [K], s [1]).
    s = 127 / max(max|x|, 1e-5), q = clamp(round_half_even(x * s), -128, 127); a token with a NaN or
    inf gets s = NaN and q = 0."""

def active_isa() -> str:
    """The kernel path in use: "avx512vnni", "avx512bw", "avx2" or "scalar" (NANOCHAT_TERNARY_ISA forces one)."""

def set_num_threads(n: int) -> None:
    """Use n >= 1 pinned threads from now on."""

def num_threads() -> int:
    """Threads in use (NANOCHAT_THREADS or every online CPU unless set)."""

def share_weight_pages(matrices: list[TernaryMatrix | Int8Matrix]) -> list[TernaryMatrix | Int8Matrix]:
    """The same matrices (any order, returned in that order) as new objects whose weights share mappings
    advised for transparent huge pages: fewer TLB misses when a decode step streams them all. Results are
    unchanged. TypeError for anything else in the list; MemoryError if the mapping fails."""

def rms_norm(x: npt.NDArray[np.float32], weight: npt.NDArray[np.float32], eps: float) -> npt.NDArray[np.float32]:
    """RMSNorm over the last dim: x * (1 / sqrt(mean(x^2) + eps)) * weight; float32 x [..., D], weight [D]."""

def silu_mul(gu: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """SiLU(gate) * up: float32 gu [N, 2F] (gate then up) -> [N, F]."""

def attend_decode(
    qkv: npt.NDArray[np.float32],
    cos: npt.NDArray[np.float32],
    sin: npt.NDArray[np.float32],
    k_cache: npt.NDArray[np.float16],
    v_cache: npt.NDArray[np.float16],
    pos: int,
    n_heads: int,
    scale: float,
) -> npt.NDArray[np.float32]:
    """One decode step of attention for one sequence: RoPE on q and k of qkv [q | k | v] (float32
    [(H + 2 KVH) hd]) with full-width cos/sin [hd], k and v written (rounded) into float16 k_cache/v_cache [KVH, capacity,
    hd] at pos, softmax attention of each query head over positions 0..=pos -> float32 [H hd]."""

def attend_prefill(
    qkv: npt.NDArray[np.float32],
    cos: npt.NDArray[np.float32],
    sin: npt.NDArray[np.float32],
    k_cache: npt.NDArray[np.float16],
    v_cache: npt.NDArray[np.float16],
    pos0: int,
    n_heads: int,
    scale: float,
) -> npt.NDArray[np.float32]:
    """Prefill attention of N new tokens of one sequence: qkv [N, (H + 2 KVH) hd] before RoPE, full-width
    cos/sin [N, hd]; every token's k and v written (rounded) into float16 k_cache/v_cache [KVH, capacity, hd]
    at pos0..pos0 + N, then token i attends over positions 0..=pos0 + i -> float32 [N, H hd]. Per token the
    same bits as attend_decode; releases the GIL."""

def mhc_read(xs: npt.NDArray[np.float32], h_pre: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """mHC read of streams xs [n, ..., D] with weights h_pre [n]: sum_i h_pre[i] xs[i] -> [..., D] (streams
    added in order; the engine's prefill and decode both call it, so they agree bit for bit)."""

def mhc_write(
    xs: npt.NDArray[np.float32],
    y: npt.NDArray[np.float32],
    h_res: npt.NDArray[np.float32],
    h_post: npt.NDArray[np.float32],
) -> None:
    """mHC write, in place on xs [n, ..., D]: xs[i] = sum_j h_res[i, j] xs[j] + h_post[i] y, y [..., D]."""

def rope_rows(x: npt.NDArray[np.float32], cos: npt.NDArray[np.float32], sin: npt.NDArray[np.float32], heads: int) -> None:
    """Rotate-half RoPE in place on the first `heads` heads of every row of x [N, row] (a prefill's q and k),
    with the rows' full-width cos/sin [N, hd]; the decode step's arithmetic."""

def causal_softmax(scores: npt.NDArray[np.float32], c: int, q0: int, scale: float) -> None:
    """In place on attention scores [..., r * c, s_len] (rows: head, then query): query i of the chunk sits at
    position q0 + i and sees keys 0..=q0 + i; visible scores are scaled and softmaxed, the rest become 0."""

MhcMatrices = tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]

class DecodeLayer:
    """The decode step of one transformer layer (rust/ternary_kernels/src/decode.rs), built once; the
    matrices are shared with the given TernaryMatrix objects, not copied."""

    def __init__(
        self,
        attn_norm: npt.NDArray[np.float32],
        qkv: TernaryMatrix,
        o: TernaryMatrix,
        ffn_norm: npt.NDArray[np.float32],
        gate_up: TernaryMatrix,
        down: TernaryMatrix,
        n_heads: int,
        n_kv_heads: int,
        eps: float,
        scale: float,
        attn_sub_norm: npt.NDArray[np.float32] | None = None,
        ffn_sub_norm: npt.NDArray[np.float32] | None = None,
        attn_mhc: MhcMatrices | None = None,
        ffn_mhc: MhcMatrices | None = None,
    ) -> None:
        """Norms float32 [D]; qkv [(H + 2 KVH) hd, D] (q, k, v rows), o [D, H hd], gate_up [2 F, D] (gate rows,
        then up), down [D, F]; sub-norms [H hd] and [F]; mHC (h_pre [n], h_post [n], h_res [n, n]), both or neither."""
    def step(
        self,
        xs: npt.NDArray[np.float32],
        cos: npt.NDArray[np.float32],
        sin: npt.NDArray[np.float32],
        k_caches: list[npt.NDArray[np.float16]],
        v_caches: list[npt.NDArray[np.float16]],
        positions: list[int],
    ) -> None:
        """The layer for B new tokens, in place on xs [n_streams, B, D]: cos/sin [B, hd] RoPE rows, one
        [KVH, capacity, hd] float16 k and v cache per sequence (k, v written at positions[i]; attention over 0..=positions[i])."""

class DecodeModel:
    """Every layer's decode step, the stream mean, the output norm and the int8 head: one call per step."""

    def __init__(self, layers: list[DecodeLayer], output_norm: npt.NDArray[np.float32], head: Int8Matrix) -> None: ...
    def step(
        self,
        xs: npt.NDArray[np.float32],
        cos: npt.NDArray[np.float32],
        sin: npt.NDArray[np.float32],
        k_caches: list[npt.NDArray[np.float16]],
        v_caches: list[npt.NDArray[np.float16]],
        positions: list[int],
    ) -> npt.NDArray[np.float32]:
        """xs [n_streams, B, D] (the new tokens' embeddings in every stream; overwritten), cos/sin [B, hd], one
        [L, KVH, capacity, hd] float16 k and v cache per sequence, the tokens' positions -> logits float32 [B, V]."""
    def times(self) -> list[tuple[str, float]]:
        """Seconds per stage so far (qkv, attention, o, gate_up, down, head, norms/mHC/SiLU), summed over layers."""
    def reset_times(self) -> None: ...
