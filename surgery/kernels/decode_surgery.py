"""Triton decode attention over the surgery cache: one query token per sequence, every cache layout.

One program handles one (sequence, KV head) and one split of the cache, so the query heads of a GQA group are
packed into the rows of one tile and each K/V tile is read once for all of them. Splits are merged by
log-sum-exp afterwards (split-KV / flash-decoding), which keeps long caches busy on many SMs.

Layouts, all through the same address arithmetic K[b, h·stride_h + t·stride_t + offset[h] + d], d < width[h]:
- full: stride_h is the head stride, offsets 0, widths head_dim;
- shared (KVSharer): the source layer's own tensors are passed, nothing is copied;
- reduced width (MatryoshkaKV): the packed (batch, 1, slots, Σ rank) tensor, stride_h 0, per-head offsets and
  widths; K and V widths may differ; queries come already projected, zero-padded to the widest head;
- ragged (token eviction): a (batch, kv_heads, slots) validity mask, so each head attends to its own kept slots.

Head dims that are not powers of two are masked to the next power of two. Shipped flat inside checkpoints; it is
imported only where triton is installed.
"""

import math
import os

import torch

try:  # transformers skips imports inside try blocks when it checks a checkpoint's requirements
    import triton
    import triton.language as tl
except ImportError:
    triton = None

    class tl:  # noqa: N801 - only so the kernel signatures below parse without triton
        constexpr = None


def kernels_usable(tensor: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, or anywhere under TRITON_INTERPRET=1 (the CPU tests)."""
    return triton is not None and (tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def _online_softmax_source(scores, v, m, l, acc):
    """One key block of a flash-style online softmax: rescale what was summed so far to the new row maxima."""
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(scores - m_safe[:, None])
    correction = tl.exp(m - m_safe)
    l = l * correction + tl.sum(p, axis=1)
    acc = acc * correction[:, None] + tl.dot(p, v)
    return m_new, l, acc


_online_softmax = triton.jit(_online_softmax_source) if triton is not None else None


def _soft_cap_source(scores, cap):
    """cap · tanh(scores / cap) (Gemma 2), with tanh(y) = 2σ(2y) − 1: the interpreter and every GPU have σ."""
    return cap * (2.0 * tl.sigmoid(2.0 * scores / cap) - 1.0)


_soft_cap = triton.jit(_soft_cap_source) if triton is not None else None


def _decode_split_kernel_source(
    Q, K, V, Valid, OutPartial, LsePartial,
    k_offsets, k_widths, v_offsets, v_widths,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_mb, stride_mh,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    slots, split_size, scale, softcap,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, HAS_VALID: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    batch = pid // KV_HEADS
    head = pid % KV_HEADS

    k_off = tl.load(k_offsets + head)
    k_width = tl.load(k_widths + head)
    v_off = tl.load(v_offsets + head)
    v_width = tl.load(v_widths + head)

    rows = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    vdims = tl.arange(0, BLOCK_DV)
    row_ok = rows < GROUP
    query_heads = head * GROUP + rows
    q = tl.load(Q + batch * stride_qb + query_heads[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & (dims[None, :] < k_width), other=0.0).to(tl.float32)

    start = split * split_size
    end = tl.minimum(start + split_size, slots)
    m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_DV), dtype=tl.float32)
    for block in range(start, end, BLOCK_N):
        cols = block + tl.arange(0, BLOCK_N)
        col_ok = cols < end
        if HAS_VALID:
            keep = tl.load(Valid + batch * stride_mb + head * stride_mh + cols, mask=col_ok, other=0)
            col_ok = col_ok & (keep != 0)
        k = tl.load(K + batch * stride_kb + head * stride_kh + cols[:, None] * stride_kt + k_off + dims[None, :],
                    mask=col_ok[:, None] & (dims[None, :] < k_width), other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k)) * scale
        if SOFTCAP:
            scores = _soft_cap(scores, softcap)
        scores = tl.where(col_ok[None, :], scores, float("-inf"))
        v = tl.load(V + batch * stride_vb + head * stride_vh + cols[:, None] * stride_vt + v_off + vdims[None, :],
                    mask=col_ok[:, None] & (vdims[None, :] < v_width), other=0.0).to(tl.float32)
        m, l, acc = _online_softmax(scores, v, m, l, acc)

    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
    lse = tl.where(l == 0.0, float("-inf"), m + tl.log(tl.where(l == 0.0, 1.0, l)))
    tl.store(OutPartial + batch * stride_ob + query_heads[:, None] * stride_oh + split * stride_os + vdims[None, :],
             out, mask=row_ok[:, None])
    tl.store(LsePartial + batch * stride_lb + query_heads * stride_lh + split, lse, mask=row_ok)


_decode_split_kernel = triton.jit(_decode_split_kernel_source) if triton is not None else None


def _pow2(n: int, floor: int = 16) -> int:
    """Tile sizes: the next power of two, at least 16 so `tl.dot` also compiles on a GPU."""
    return max(floor, 1 << (max(n, 1) - 1).bit_length())


def cache_layout(keys, values, key_widths, value_widths, kv_heads, device):
    """Per-KV-head (offset, width) of K and V, the head strides, and the widest head, for any cache layout."""
    if key_widths is not None:  # packed reduced width: heads side by side in the last dim
        k_w = torch.tensor(key_widths, dtype=torch.int32, device=device)
        v_w = torch.tensor(value_widths, dtype=torch.int32, device=device)
        return (torch.cumsum(k_w, 0, dtype=torch.int32) - k_w, k_w, torch.cumsum(v_w, 0, dtype=torch.int32) - v_w, v_w,
                0, 0, max(key_widths), max(value_widths))
    zeros = torch.zeros(kv_heads, dtype=torch.int32, device=device)
    k_w = torch.full((kv_heads,), keys.shape[-1], dtype=torch.int32, device=device)
    v_w = torch.full((kv_heads,), values.shape[-1], dtype=torch.int32, device=device)
    return zeros, k_w, zeros, v_w, keys.stride(1), values.stride(1), keys.shape[-1], values.shape[-1]


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
                     valid: torch.Tensor | None = None, key_widths: list[int] | None = None,
                     value_widths: list[int] | None = None, split_size: int = 512, block_n: int = 32,
                     return_lse: bool = False,
                     softcap: float | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query token per head over a cache; returns (batch, heads, value width) in query dtype,
    and with `return_lse` the row log-sum-exp (batch, heads) in float32, so several views can be merged.

    query: (batch, heads, width) — for a reduced-width cache, each head's projected query, zero-padded.
    keys/values: (batch, kv_heads, slots, head_dim), or packed (batch, 1, slots, Σ widths) with `*_widths`.
    valid: optional (batch, kv_heads, slots) mask of the slots each head may attend to.
    softcap: scaled scores pass through softcap · tanh(s / softcap) (Gemma 2).
    """
    batch, heads, _ = query.shape
    kv_heads = len(key_widths) if key_widths is not None else keys.shape[1]
    group = heads // kv_heads
    slots = keys.shape[2]
    device = query.device
    k_off, k_w, v_off, v_w, k_head_stride, v_head_stride, width_k, width_v = cache_layout(
        keys, values, key_widths, value_widths, kv_heads, device)
    for tensor in (keys, values):
        if tensor.stride(-1) != 1:
            raise ValueError("the cache's last dimension must be contiguous")
    query = query.contiguous()
    splits = max(1, math.ceil(slots / split_size))
    out = torch.empty(batch, heads, splits, _pow2(width_v), dtype=torch.float32, device=device)
    lse = torch.empty(batch, heads, splits, dtype=torch.float32, device=device)
    mask = valid.to(torch.int8).contiguous() if valid is not None else query  # dummy pointer when absent
    _decode_split_kernel[(batch * kv_heads, splits)](
        query, keys, values, mask, out, lse, k_off, k_w, v_off, v_w,
        query.stride(0), query.stride(1),
        keys.stride(0), k_head_stride, keys.stride(2),
        values.stride(0), v_head_stride, values.stride(2),
        mask.stride(0) if valid is not None else 0, mask.stride(1) if valid is not None else 0,
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        slots, split_size, scale, softcap or 1.0,
        KV_HEADS=kv_heads, GROUP=group, BLOCK_G=_pow2(group), BLOCK_D=_pow2(width_k), BLOCK_DV=_pow2(width_v),
        BLOCK_N=block_n, HAS_VALID=valid is not None, SOFTCAP=softcap is not None,
    )
    top = lse.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp(lse - top)
    total = weights.sum(-1, keepdim=True)
    merged = ((out * weights[..., None]).sum(2) / total.clamp_min(1e-30))[..., :width_v].to(query.dtype)
    if not return_lse:
        return merged
    return merged, torch.where(total > 0, top + torch.log(total.clamp_min(1e-30)), float("-inf"))[..., 0]
