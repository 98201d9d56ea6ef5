"""Triton prefill attention over the surgery cache (causal, every layout), and the observation-window sums.

Prefill: one program per (query block, sequence, query head), flash-attention style online softmax over the key
blocks. Causality comes from token positions: by default the queries are the newest `q_len` slots and slot i holds
token i, so only the blocks up to the block's last query are visited; with explicit query and key positions (a
layer that holds only some tokens) every block is visited and a key is seen by the queries at or after its
position. Layouts use the same address arithmetic as the decode kernel (full, shared, packed reduced-width with
per-head offsets and widths, a validity mask for evicted or padded slots). It also returns each row's
log-sum-exp, which is what `window_sums_from_lse` needs: the attention of the last w queries to every key, summed
over them, is Σ_rows exp(q·k·scale − lse_row), computed block by block without forming the attention matrix.

Shipped flat inside checkpoints; imported only where triton is installed.
"""

import torch

from .decode_surgery import _online_softmax, _pow2, _soft_cap, cache_layout

try:  # transformers skips imports inside try blocks when it checks a checkpoint's requirements
    import triton
    import triton.language as tl
except ImportError:
    triton = None

    class tl:  # noqa: N801 - only so the kernel signatures below parse without triton
        constexpr = None


def _prefill_kernel_source(
    Q, K, V, Valid, QPos, KPos, First, Until, Out, Lse,
    k_offsets, k_widths, v_offsets, v_widths,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_mb, stride_mh,
    stride_qpb, stride_kpb, stride_kph, stride_ub, stride_uh,
    stride_ob, stride_oh, stride_ot,
    stride_lb, stride_lh,
    q_len, slots, scale, sinks, recent, softcap,
    HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_VALID: tl.constexpr, HAS_POSITIONS: tl.constexpr,
    BAND: tl.constexpr, HAS_UNTIL: tl.constexpr, SOFTCAP: tl.constexpr,
):
    block_m = tl.program_id(0)
    pid = tl.program_id(1)
    batch = pid // HEADS
    query_head = pid % HEADS
    head = query_head // GROUP
    k_off = tl.load(k_offsets + head)
    k_width = tl.load(k_widths + head)
    v_off = tl.load(v_offsets + head)
    v_width = tl.load(v_widths + head)

    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    if HAS_POSITIONS:
        row_positions = tl.load(QPos + batch * stride_qpb + rows, mask=row_ok, other=-1)
        last = slots
    else:
        row_positions = slots - q_len + rows
        last = tl.minimum(slots, slots - q_len + (block_m + 1) * BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    vdims = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + batch * stride_qb + query_head * stride_qh + rows[:, None] * stride_qt + dims[None, :],
                mask=row_ok[:, None] & (dims[None, :] < k_width), other=0.0).to(tl.float32)

    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    for block in range(0, last, BLOCK_N):
        cols = block + tl.arange(0, BLOCK_N)
        col_ok = cols < slots
        if HAS_VALID:
            keep = tl.load(Valid + batch * stride_mb + head * stride_mh + cols, mask=col_ok, other=0)
            col_ok = col_ok & (keep != 0)
        k = tl.load(K + batch * stride_kb + head * stride_kh + cols[:, None] * stride_kt + k_off + dims[None, :],
                    mask=col_ok[:, None] & (dims[None, :] < k_width), other=0.0).to(tl.float32)
        if HAS_POSITIONS:
            col_positions = tl.load(KPos + batch * stride_kpb + head * stride_kph + cols, mask=col_ok, other=0)
        else:
            col_positions = cols
        allowed = col_ok[None, :] & (col_positions[None, :] <= row_positions[:, None])
        if BAND != 0:  # PoD: proximal (1) or distant (2) tokens of each query
            first = tl.load(First + batch)
            proximal = ((col_positions[None, :] - first) < sinks) | (col_positions[None, :] > row_positions[:, None] - recent)
            allowed = allowed & (proximal if BAND == 1 else (proximal == 0))
        if HAS_UNTIL:  # a slot flagged for eviction is read by its own query only
            until = tl.load(Until + batch * stride_ub + head * stride_uh + cols, mask=col_ok, other=0)
            allowed = allowed & (row_positions[:, None] <= until[None, :])
        scores = tl.dot(q, tl.trans(k)) * scale
        if SOFTCAP:
            scores = _soft_cap(scores, softcap)
        scores = tl.where(allowed, scores, float("-inf"))
        v = tl.load(V + batch * stride_vb + head * stride_vh + cols[:, None] * stride_vt + v_off + vdims[None, :],
                    mask=col_ok[:, None] & (vdims[None, :] < v_width), other=0.0).to(tl.float32)
        m, l, acc = _online_softmax(scores, v, m, l, acc)

    safe_l = tl.where(l == 0.0, 1.0, l)
    tl.store(Out + batch * stride_ob + query_head * stride_oh + rows[:, None] * stride_ot + vdims[None, :],
             acc / safe_l[:, None], mask=row_ok[:, None])
    lse = tl.where(l == 0.0, float("-inf"), m + tl.log(safe_l))
    tl.store(Lse + batch * stride_lb + query_head * stride_lh + rows, lse, mask=row_ok)


def _window_sums_kernel_source(
    Q, K, Valid, Lse, Sums, k_offsets, k_widths,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_mb, stride_mh,
    stride_lb, stride_lh,
    stride_sb, stride_sh,
    q_len, slots, window, prefix, scale, softcap,
    HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_VALID: tl.constexpr, SOFTCAP: tl.constexpr,
):
    block_n = tl.program_id(0)
    pid = tl.program_id(1)
    batch = pid // HEADS
    query_head = pid % HEADS
    head = query_head // GROUP
    k_off = tl.load(k_offsets + head)
    k_width = tl.load(k_widths + head)
    dims = tl.arange(0, BLOCK_D)
    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < prefix
    if HAS_VALID:  # padded or evicted slots get no attention, as in the prefill that produced the lse
        keep = tl.load(Valid + batch * stride_mb + head * stride_mh + cols, mask=col_ok, other=0)
        col_ok = col_ok & (keep != 0)
    k = tl.load(K + batch * stride_kb + head * stride_kh + cols[:, None] * stride_kt + k_off + dims[None, :],
                mask=col_ok[:, None] & (dims[None, :] < k_width), other=0.0).to(tl.float32)
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(q_len - window, q_len, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len
        q = tl.load(Q + batch * stride_qb + query_head * stride_qh + rows[:, None] * stride_qt + dims[None, :],
                    mask=row_ok[:, None] & (dims[None, :] < k_width), other=0.0).to(tl.float32)
        lse = tl.load(Lse + batch * stride_lb + query_head * stride_lh + rows, mask=row_ok, other=float("inf"))
        row_slots = slots - q_len + rows
        allowed = row_ok[:, None] & col_ok[None, :] & (cols[None, :] <= row_slots[:, None])
        scores = tl.dot(q, tl.trans(k)) * scale
        if SOFTCAP:
            scores = _soft_cap(scores, softcap)
        p = tl.where(allowed, tl.exp(scores - lse[:, None]), 0.0)
        total += tl.sum(p, axis=0)
    tl.store(Sums + batch * stride_sb + query_head * stride_sh + cols, total, mask=cols < prefix)


_prefill_kernel = triton.jit(_prefill_kernel_source) if triton is not None else None
_window_sums_kernel = triton.jit(_window_sums_kernel_source) if triton is not None else None


def prefill_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
                      valid: torch.Tensor | None = None, key_widths: list[int] | None = None,
                      value_widths: list[int] | None = None, block_m: int = 16, block_n: int = 32,
                      query_positions: torch.Tensor | None = None,
                      key_positions: torch.Tensor | None = None, band=None,
                      key_until: torch.Tensor | None = None,
                      softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention; returns ((batch, heads, q_len, value width), lse float32).

    query: (batch, heads, q_len, width), projected and zero-padded per head for a reduced-width cache.
    keys/values: (batch, kv_heads, slots, head_dim), or packed (batch, 1, slots, Σ widths) with `*_widths`.
    query_positions (batch|1, q_len) and key_positions (batch|1, kv_heads|1, slots): token indices; by default the
    queries are the newest q_len slots and slot i holds token i.
    band: PoD's `Band` (sinks, recent, distant, first): each query sees only its proximal or its distant tokens.
    key_until (batch, kv_heads|1, slots): the last query position that may read each slot (a gate's eviction).
    softcap: scaled scores pass through softcap · tanh(s / softcap) (Gemma 2).
    """
    batch, heads, q_len, _ = query.shape
    kv_heads = len(key_widths) if key_widths is not None else keys.shape[1]
    slots = keys.shape[2]
    k_off, k_w, v_off, v_w, k_stride, v_stride, width_k, width_v = cache_layout(keys, values, key_widths, value_widths,
                                                                          kv_heads, query.device)
    query = query.contiguous()
    out = torch.empty(batch, heads, q_len, _pow2(width_v), dtype=torch.float32, device=query.device)
    lse = torch.empty(batch, heads, q_len, dtype=torch.float32, device=query.device)
    mask = valid.to(torch.int8).contiguous() if valid is not None else query
    has_positions = query_positions is not None or key_positions is not None
    if has_positions:
        if query_positions is None:
            query_positions = torch.arange(slots - q_len, slots, device=query.device)[None]
        if key_positions is None:
            key_positions = torch.arange(slots, device=query.device)[None, None]
        query_positions = query_positions.to(torch.int32).expand(batch, -1).contiguous()
        key_positions = key_positions.to(torch.int32).expand(batch, kv_heads, -1).contiguous()
    else:
        query_positions = key_positions = mask  # dummy pointers
    if band is not None:
        first = band.first if band.first is not None else torch.zeros(batch, dtype=torch.long, device=query.device)
        first = first.to(torch.int32).expand(batch).contiguous()
    else:
        first = mask  # dummy pointer
    if key_until is not None:
        until = key_until.clamp(max=torch.iinfo(torch.int32).max).to(torch.int32).expand(batch, kv_heads, -1).contiguous()
    else:
        until = mask  # dummy pointer
    grid = (triton.cdiv(q_len, block_m), batch * heads)
    _prefill_kernel[grid](
        query, keys, values, mask, query_positions, key_positions, first, until, out, lse, k_off, k_w, v_off, v_w,
        query.stride(0), query.stride(1), query.stride(2),
        keys.stride(0), k_stride, keys.stride(2),
        values.stride(0), v_stride, values.stride(2),
        mask.stride(0) if valid is not None else 0, mask.stride(1) if valid is not None else 0,
        query_positions.stride(0) if has_positions else 0, key_positions.stride(0) if has_positions else 0,
        key_positions.stride(1) if has_positions else 0,
        until.stride(0) if key_until is not None else 0, until.stride(1) if key_until is not None else 0,
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        q_len, slots, scale, band.sinks if band else 0, band.recent if band else 0, softcap or 1.0,
        HEADS=heads, GROUP=heads // kv_heads, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_pow2(width_k),
        BLOCK_DV=_pow2(width_v), HAS_VALID=valid is not None, HAS_POSITIONS=has_positions,
        BAND=0 if band is None else 2 if band.distant else 1, HAS_UNTIL=key_until is not None,
        SOFTCAP=softcap is not None,
    )
    return out[..., :width_v].to(query.dtype), lse


def window_sums_from_lse(query: torch.Tensor, keys: torch.Tensor, lse: torch.Tensor, scale: float, window: int,
                        key_widths: list[int] | None = None, valid: torch.Tensor | None = None, block_m: int = 16,
                        block_n: int = 32, all_slots: bool = False, softcap: float | None = None) -> torch.Tensor:
    """(batch, heads, prefix) attention of the last `window` queries to each prefix slot, summed over them
    (to every slot with `all_slots`, which ZigZagKV's attention mass needs), from the prefill's row log-sum-exp.
    `valid` (batch, kv_heads, slots): the slots the prefill could attend to (padding); the others get 0."""
    batch, heads, q_len, _ = query.shape
    kv_heads = len(key_widths) if key_widths is not None else keys.shape[1]
    slots = keys.shape[2]
    window = min(window, q_len)
    prefix = slots if all_slots else slots - window
    k_off, k_w, _, _, k_stride, _, width_k, _ = cache_layout(keys, keys, key_widths, key_widths, kv_heads, query.device)
    query = query.contiguous()
    sums = torch.empty(batch, heads, max(prefix, 0), dtype=torch.float32, device=query.device)
    if prefix <= 0:
        return sums
    mask = valid.to(torch.int8).contiguous() if valid is not None else query
    _window_sums_kernel[(triton.cdiv(prefix, block_n), batch * heads)](
        query, keys, mask, lse, sums, k_off, k_w,
        query.stride(0), query.stride(1), query.stride(2),
        keys.stride(0), k_stride, keys.stride(2),
        mask.stride(0) if valid is not None else 0, mask.stride(1) if valid is not None else 0,
        lse.stride(0), lse.stride(1),
        sums.stride(0), sums.stride(1),
        q_len, slots, window, prefix, scale, softcap or 1.0,
        HEADS=heads, GROUP=heads // kv_heads, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_pow2(width_k),
        HAS_VALID=valid is not None, SOFTCAP=softcap is not None,
    )
    return sums
