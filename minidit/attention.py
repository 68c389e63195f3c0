"""Attention: multi-head self- and cross-attention, fast (SDPA) and explicit (returns the weights).

Training runs `F.scaled_dot_product_attention` (SDPA), except for short sequences on a CPU: there PyTorch's fused
kernel (its backward above all, in bf16 most) is slower than plain matmul → softmax → matmul, so the same math runs
unfused (`runs_unfused`; `benchmarks/attention_kernels.py` measures both). The explicit path also returns the
attention weights (B, heads, T_query, T_key), softmax in fp32; it runs only when asked (`return_weights=True`, or
while an `AttentionRecorder` is attached, see `minidit.viz`).

Masks: a key padding mask is a bool tensor (B, T_key), True = a real token that may be attended to.

Variants (options of `Attention`, all off by default; DiT and SD3 use none of them, see notebook 12):
grouped-query attention (`n_kv_heads`), ALiBi on the 2D distance between patches (`alibi`), 2D rotary
positions (`rope`) and tiled attention with pooled global tokens (`window`, `global_tokens`). Those that need
positions take the token grid (`grid`, tokens in row-major order as `minidit.tokens.patchify` makes them).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _expand_mask(mask: torch.Tensor | None, B: int, Tk: int) -> torch.Tensor | None:
    """Key padding mask (B, Tk) → broadcastable (B, 1, 1, Tk); 4-D masks pass through."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        raise ValueError(f"attention mask must be bool (True = attend), got {mask.dtype}")
    if mask.ndim == 2:
        if mask.shape != (B, Tk):
            raise ValueError(f"key padding mask must be (B, T_key) = ({B}, {Tk}), got {tuple(mask.shape)}")
        if not torch.compiler.is_compiling() and not bool(mask.any(dim=1).all()):
            raise ValueError("every sequence needs at least one unmasked key (a row of the mask is all False)")
        return mask[:, None, None, :]  # (B, 1, 1, Tk)
    if mask.ndim == 4:
        return mask
    raise ValueError(f"attention mask must be (B, T_key) or 4-D, got shape {tuple(mask.shape)}")


# Up to this many keys, unfused attention was as fast as SDPA or faster (forward + backward, 2-core CPU, four runs
# of benchmarks/attention_kernels.py): bf16 1.7–3.8× up to 196 keys, 1.45–1.6× at 512, 0.7–1.3× at 1,024;
# fp32 1.2–1.3× at 16 keys, 1.0–1.1× from 32 to 64, 0.8–0.9× at 128. Elsewhere (GPUs, fp16, longer sequences) SDPA.
CPU_UNFUSED_MAX_KEYS = {torch.float32: 64, torch.bfloat16: 512}
# Rows shorter than this get their softmax in fp32 on the unfused path: PyTorch's bf16 CPU softmax handles a row
# shorter than its vector width slowly (forward + backward at 16 keys 0.47 ms in bf16 against 0.13–0.18 ms through
# fp32; from 32 keys bf16 is as fast or faster). The forward values are the same bits; the gradients are rounded once.
FP32_SOFTMAX_BELOW_KEYS = 32


def runs_unfused(device: torch.device | str, dtype: torch.dtype, keys: int) -> bool:
    """True where `attention` trains with matmul → softmax → matmul rather than SDPA: on a CPU, short sequences.

    Unfused, autograd keeps the (B, H, T_query, T_key) weights for backward (`minidit.cost` counts them)."""
    return torch.device(device).type == "cpu" and keys <= CPU_UNFUSED_MAX_KEYS.get(dtype, 0)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    return_weights: bool = False,
    bias: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(q·kᵀ/√d + bias + mask)·v for q (B, H, Tq, d), k/v (B, H, Tk, d); mask as in `_expand_mask`.

    `bias` is an optional additive float score bias broadcastable to (B, H, Tq, Tk) (e.g. ALiBi).
    `return_weights=False` uses SDPA (unfused for short sequences on a CPU, `runs_unfused`); True uses the explicit
    path and returns (out, weights (B, H, Tq, Tk)).
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be (B, H, T, d), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if bias is not None and not bias.is_floating_point():
        raise ValueError(f"bias must be a float tensor (additive scores), got {bias.dtype}; pass bool masks as mask")
    B, _, _, d = q.shape
    m = _expand_mask(mask, B, k.shape[2])
    if not return_weights and not runs_unfused(q.device, q.dtype, k.shape[2]):
        if bias is not None:  # SDPA takes one float mask: the bias with -inf where the bool mask forbids
            bias = bias.to(q.dtype)
            m = bias if m is None else bias.masked_fill(~m, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(d)  # (B, H, Tq, Tk)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    if m is not None:
        scores = scores.masked_fill(~m, float("-inf"))
    if not return_weights:  # the unfused training path: softmax in q's dtype, or in fp32 over short rows
        short = k.shape[2] < FP32_SOFTMAX_BELOW_KEYS
        return scores.softmax(dim=-1, dtype=torch.float32 if short else None).to(q.dtype) @ v  # (B, H, Tq, d)
    weights = scores.float().softmax(dim=-1).to(q.dtype)
    return weights @ v, weights  # (B, H, Tq, d), (B, H, Tq, Tk)


class QKNorm(nn.RMSNorm):
    """RMSNorm of each head's q or k (QK-norm) with the gain cast to the input's dtype: under bf16 autocast the
    inputs are bf16 and an fp32 gain would keep PyTorch off its fused kernel (and make it warn)."""

    def __init__(self, head_dim: int, eps: float = 1e-6):
        super().__init__(head_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, T, H·d) → (B, H, T, d)."""
    B, T, D = x.shape
    return x.reshape(B, T, num_heads, D // num_heads).transpose(1, 2)  # (B, H, T, d)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, d) → (B, T, H·d)."""
    B, H, T, d = x.shape
    return x.transpose(1, 2).reshape(B, T, H * d)  # (B, T, D)


# ---- attention variants: positions, biases, rotations, tiles ----------------------------------------------------
ALIBI_DISTANCES = ("euclidean", "manhattan")
ATTENTION_OPTIONS = ("n_kv_heads", "rope", "alibi", "window", "global_tokens")  # Attention's variant keywords
ROPE_THETA = 100.0  # 2D RoPE base for short axes (RoPE-ViT, Heo et al. 2024); LLMs use 10,000 for long 1D contexts


def grid_positions(h: int, w: int) -> torch.Tensor:
    """(row, column) of each token of an h×w grid in row-major order: (h·w, 2) int64."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=1)  # (T, 2)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's geometric per-head slopes 2^(−8k/H), k = 1…H (Press et al. 2022): (H,)."""
    return 2.0 ** (-8.0 * torch.arange(1, num_heads + 1, dtype=torch.float64) / num_heads)


def alibi_2d_bias(num_heads: int, h: int, w: int, distance: str = "euclidean") -> torch.Tensor:
    """ALiBi adapted to images: score bias −slope_h · dist(patch i, patch j) on the h×w grid, (H, T, T) float32."""
    if distance not in ALIBI_DISTANCES:
        raise ValueError(f"alibi distance must be one of {ALIBI_DISTANCES}, got {distance!r}")
    pos = grid_positions(h, w).double()
    diff = pos[:, None, :] - pos[None, :, :]  # (T, T, 2)
    dist = diff.norm(dim=-1) if distance == "euclidean" else diff.abs().sum(dim=-1)  # (T, T)
    return (-alibi_slopes(num_heads)[:, None, None] * dist).float()  # (H, T, T)


def rope_2d_angles(head_dim: int, h: int, w: int, theta: float = ROPE_THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, d/2) of 2D RoPE: channel pairs of the first half of a head rotate with the row,
    those of the second half with the column, at frequencies theta^(−i/(d/4)), i = 0…d/4 − 1."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dim divisible by 4 (two axes × channel pairs), got {head_dim}")
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # (d/4,)
    pos = grid_positions(h, w).double()
    angles = torch.cat([pos[:, :1] * freqs, pos[:, 1:] * freqs], dim=1)  # (T, d/2): row pairs, column pairs
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair (2i, 2i+1) of x (B, H, T, d) by the angle with cos/sin (T, d/2)[:, i]."""
    x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, H, T, d/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, H, T, d/2, 2)
    return out.flatten(-2)  # (B, H, T, d)


def window_mask(h: int, w: int, window: int, global_tokens: int = 0) -> torch.Tensor:
    """Tiled attention as a mask (T, T + G): a query sees the keys of its own window×window tile and all G
    global tokens (appended after the T image keys)."""
    tile = grid_positions(h, w) // window  # (T, 2): the tile of each token
    same = (tile[:, None, :] == tile[None, :, :]).all(dim=-1)  # (T, T)
    return torch.cat([same, torch.ones(h * w, global_tokens, dtype=torch.bool)], dim=1)  # (T, T + G)


def pool_tokens(x: torch.Tensor, h: int, w: int, g: int) -> torch.Tensor:
    """Average x (B, H, T, d) over a g×g partition of its h×w grid: the g² global tokens (B, H, g², d)."""
    B, H, _, d = x.shape
    x = x.reshape(B, H, g, h // g, g, w // g, d)  # (B, H, gy, ry, gx, rx, d)
    return x.mean(dim=(3, 5)).reshape(B, H, g * g, d)  # (B, H, G, d)


def to_tiles(x: torch.Tensor, h: int, w: int, window: int) -> torch.Tensor:
    """(B, H, T, d) row-major grid → (B, H, n, window², d), n = (h/window)·(w/window) tiles."""
    B, H, _, d = x.shape
    ny, nx = h // window, w // window
    x = x.reshape(B, H, ny, window, nx, window, d).permute(0, 1, 2, 4, 3, 5, 6)  # (B, H, ny, nx, wy, wx, d)
    return x.reshape(B, H, ny * nx, window * window, d)  # (B, H, n, window², d)


def from_tiles(x: torch.Tensor, h: int, w: int, window: int) -> torch.Tensor:
    """The inverse of `to_tiles`: (B, H, n, window², d) → (B, H, T, d)."""
    B, H, _, _, d = x.shape
    ny, nx = h // window, w // window
    x = x.reshape(B, H, ny, nx, window, window, d).permute(0, 1, 2, 4, 3, 5, 6)  # (B, H, ny, wy, nx, wx, d)
    return x.reshape(B, H, h * w, d)  # (B, H, T, d)


def check_attention_options(
    num_heads: int,
    head_dim: int,
    grid: int | tuple[int, int] | None = None,
    n_kv_heads: int | None = None,
    rope: bool = False,
    alibi: str | None = None,
    window: int | None = None,
    global_tokens: int = 0,
) -> tuple[int, int] | None:
    """Validate `Attention`'s variant options; returns the grid as (h, w), or None when none is given."""
    if n_kv_heads is not None and (not isinstance(n_kv_heads, int) or n_kv_heads < 1 or num_heads % n_kv_heads):
        raise ValueError(f"n_kv_heads must be a positive divisor of num_heads={num_heads}, got {n_kv_heads!r}")
    if alibi is not None and alibi not in ALIBI_DISTANCES:
        raise ValueError(f"alibi must be None or one of {ALIBI_DISTANCES}, got {alibi!r}")
    if rope and head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim % 4 == 0, got head_dim {head_dim}")
    if not isinstance(global_tokens, int) or global_tokens < 0:
        raise ValueError(f"global_tokens must be an int ≥ 0, got {global_tokens!r}")
    if global_tokens and not window:
        raise ValueError("global_tokens only make sense with window (full attention already sees every token)")
    if window is not None and alibi is not None:
        raise ValueError("window and alibi cannot be combined (choose one way to localise attention)")
    if grid is None:
        if rope or alibi or window:
            raise ValueError("rope, alibi and window need the token grid: pass grid=(h, w) (or an int for a square)")
        return None
    h, w = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if window is not None and (not isinstance(window, int) or window < 1 or h % window or w % window):
        raise ValueError(f"window must be a positive int dividing the {h}×{w} token grid, got {window!r}")
    g = math.isqrt(global_tokens)
    if global_tokens and (g * g != global_tokens or h % g or w % g):
        raise ValueError(f"global_tokens must be g² with g dividing the {h}×{w} grid (1, 4, …), got {global_tokens}")
    return h, w


class _Recordable(nn.Module):
    """Base for attention modules whose weights a recorder can collect (explicit path only while recording)."""

    def __init__(self):
        super().__init__()
        self.recorder = None  # set by minidit.viz.AttentionRecorder

    def _attend(self, q, k, v, mask, return_weights, bias=None):
        want = return_weights or self.recorder is not None
        if not want:
            return attention(q, k, v, mask, bias=bias), None
        out, w = attention(q, k, v, mask, return_weights=True, bias=bias)
        if self.recorder is not None:
            self.recorder.add(self, w)
        return out, w


class Attention(_Recordable):
    """Multi-head self-attention (DiT / timm layout): fused qkv Linear, optional QK-RMSNorm, output Linear.

    Variant options (default off = plain multi-head attention, identical to DiT):
    - n_kv_heads < num_heads: grouped-query attention; heads share keys/values in groups of num_heads / n_kv_heads.
    - alibi = "euclidean" | "manhattan": no positions in q/k; scores get −slope_h · distance(patch i, patch j).
    - rope = True: 2D rotary positions, first half of each head rotated by row, second half by column.
    - window = w: each token attends within its w×w tile of the grid; global_tokens = g² adds g² pooled tokens
      (keys/values averaged over a g×g partition of the image) that every query also sees. Trained on the
      block-sparse path (tiles as a batch), shown (weights (B, H, T, T + G)) through the equivalent mask.
    `grid` (h, w) is the token grid; rope, alibi and window need it.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        n_kv_heads: int | None = None,
        grid: int | tuple[int, int] | None = None,
        rope: bool = False,
        alibi: str | None = None,
        window: int | None = None,
        global_tokens: int = 0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.grid = check_attention_options(num_heads, self.head_dim, grid, n_kv_heads, rope, alibi, window,
                                            global_tokens)
        self.n_kv_heads = num_heads if n_kv_heads is None else n_kv_heads
        self.window, self.global_tokens = window, global_tokens
        self.qkv = nn.Linear(dim, dim + 2 * self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.q_norm = QKNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = QKNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.rope, self.alibi = rope, alibi
        if rope:
            cos, sin = rope_2d_angles(self.head_dim, *self.grid)
            self.register_buffer("rope_cos", cos, persistent=False)  # (T, d/2)
            self.register_buffer("rope_sin", sin, persistent=False)
        if alibi is not None:
            self.register_buffer("alibi_bias", alibi_2d_bias(num_heads, *self.grid, alibi), persistent=False)
        if window is not None:
            self.register_buffer("window_mask", window_mask(*self.grid, window, global_tokens), persistent=False)

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, H, T, d), k, v (B, H, T, d): views of one fused projection (k/v repeated per group for GQA)."""
        kv = self.n_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([x.shape[-1], kv, kv], dim=-1)  # (B, T, D), (B, T, Hkv·d) ×2
        q, k, v = split_heads(q, self.num_heads), split_heads(k, self.n_kv_heads), split_heads(v, self.n_kv_heads)
        if self.n_kv_heads != self.num_heads:  # grouped-query attention: each k/v head serves `group` query heads
            group = self.num_heads // self.n_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, T, d)
        return q, k, v

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_weights: bool = False):
        B, T, D = x.shape
        if self.grid is not None and T != self.grid[0] * self.grid[1]:
            raise ValueError(f"this attention was built for a {self.grid[0]}×{self.grid[1]} token grid, got T = {T}")
        q, k, v = self._heads(x)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = apply_rope(q, self.rope_cos, self.rope_sin), apply_rope(k, self.rope_cos, self.rope_sin)
        if self.window is None:
            bias = self.alibi_bias if self.alibi is not None else None
            out, w = self._attend(q, k, v, mask, return_weights, bias=bias)
        else:
            out, w = self._windowed(q, k, v, mask, return_weights)
        out = self.proj(merge_heads(out))  # (B, T, D)
        return (out, w) if return_weights else out

    def _windowed(self, q, k, v, mask, return_weights):
        """Tiled attention (+ pooled global tokens): block-sparse when training, the dense mask when showing."""
        if mask is not None:
            raise ValueError("windowed attention takes no key padding mask (image tokens are never padding)")
        (h, w), win, G = self.grid, self.window, self.global_tokens
        if G:
            g = math.isqrt(G)
            k_g, v_g = pool_tokens(k, h, w, g), pool_tokens(v, h, w, g)  # (B, H, G, d)
        if return_weights or self.recorder is not None:
            if G:
                k, v = torch.cat([k, k_g], dim=2), torch.cat([v, v_g], dim=2)  # (B, H, T + G, d)
            return self._attend(q, k, v, self.window_mask[None, None], return_weights)
        B, H, T, d = q.shape
        qt, kt, vt = (to_tiles(z, h, w, win) for z in (q, k, v))  # (B, H, n, win², d)
        n = qt.shape[2]
        if G:
            kt = torch.cat([kt, k_g[:, :, None].expand(B, H, n, G, d)], dim=3)  # (B, H, n, win² + G, d)
            vt = torch.cat([vt, v_g[:, :, None].expand(B, H, n, G, d)], dim=3)
        out = attention(qt.flatten(1, 2), kt.flatten(1, 2), vt.flatten(1, 2))  # (B, H·n, win², d)
        return from_tiles(out.reshape(B, H, n, win * win, d), h, w, win), None


class CrossAttention(_Recordable):
    """Queries from the image tokens (width dim), keys/values from a context of its own width (kdim = vdim)."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim, self.context_dim = num_heads, dim // num_heads, context_dim
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        self.q_norm = QKNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = QKNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        return_weights: bool = False,
    ):
        if context.ndim != 3 or context.shape[-1] != self.context_dim or context.shape[0] != x.shape[0]:
            raise ValueError(f"context must be (B, L, {self.context_dim}) with B = {x.shape[0]}, "
                             f"got {tuple(context.shape)}")
        B, L, _ = context.shape
        q = split_heads(self.q(x), self.num_heads)  # (B, H, T, d)
        kv = self.kv(context).reshape(B, L, 2, self.num_heads, self.head_dim)  # (B, L, 2, H, d)
        k, v = kv.permute(2, 0, 3, 1, 4)  # each (B, H, L, d)
        q, k = self.q_norm(q), self.k_norm(k)
        out, w = self._attend(q, k, v, context_mask, return_weights)
        out = self.proj(merge_heads(out))  # (B, T, D)
        return (out, w) if return_weights else out
