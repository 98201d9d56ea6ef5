"""The one attention function of the surgery decoder: queries attend over *views* of the cache.

A view is what one layer reads: keys, values, the original token position of every slot, which slots are valid
(padding, eviction), and an optional reduced-width projection (MatryoshkaKV). `attend(query, positions, views)`
serves every layout. Causality and sliding windows come from comparing query positions with the positions each
view carries, never from slot order, so a layer that holds only some tokens (eviction, routing) masks correctly.
Several views merge exactly by their row log-sum-exp: softmax over the union of their keys equals the
log-sum-exp-weighted mix of the partial outputs (how PoD joins near and distant tokens, and how split-KV works).

The PyTorch path and the Triton path both implement it. A single dense view with plain causal attention keeps
SDPA's fast path; the log-sum-exp is computed only when it is asked for, and several views that nothing needs the
log-sum-exp of run as one SDPA call over their concatenation (the same softmax over the union).

Shipped flat inside every checkpoint: imports torch, transformers' public attention registries and, behind a guard,
the Triton kernels.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

try:  # flat in a checkpoint, the kernels sit beside this file
    from .decode_surgery import decode_attention, kernels_usable
    from .prefill_surgery import prefill_attention, window_sums_from_lse
except ImportError:  # inside the surgery package they live in surgery/kernels
    try:
        from surgery.kernels.decode_surgery import decode_attention, kernels_usable
        from surgery.kernels.prefill_surgery import prefill_attention, window_sums_from_lse
    except ImportError:  # no triton: the PyTorch path serves everything
        decode_attention = kernels_usable = prefill_attention = window_sums_from_lse = None

TRITON_IMPLEMENTATION = "surgery_triton"


class ViewRule:
    """What a recipe adds to a view beyond keys, values, positions and validity: which (query, slot) pairs it
    allows, and optionally a weight on each slot. A view carries its rules in `rules`; the core asks them through
    these methods and never by kind (PoD's proximal/distant bands, an Attention-Gate's eviction are rules).

    key: what identifies the rule's mask, so the layers that read the same layout share one.
    """

    key: tuple = ()
    per_slot: bool = False  # whether it carries a tensor per slot (then a view's slots cannot be cut into ranges)

    def key_ranges(self, first_query: int, last_query: int) -> list[tuple[int, int]] | None:
        """Inclusive ranges of key positions this rule may allow to the queries at positions first..last (a
        superset is fine); None: no bound beyond causality. Lets a long prefill attend block by block over the
        slots each block can reach."""
        return None

    def allows(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor | None:
        """query_positions (batch|1, 1, q, 1), key_positions (batch|1, heads|1, 1, slots) -> bool, broadcast."""
        return None

    def head(self, head: int) -> "ViewRule":
        """The rule for one KV head of the view (per-head attention over packed heads)."""
        return self

    def slot_weights(self) -> torch.Tensor | None:
        """(batch, kv_heads, slots) multiplicative weights on each slot's unnormalised attention for the queries
        after it (the slot's own query sees it at weight 1); None: weight 1."""
        return None

    def kernel_arguments(self) -> dict:
        """The keyword arguments of the Triton prefill kernel that express this rule."""
        return {}


def pick_head(tensor: torch.Tensor | None, head: int) -> torch.Tensor | None:
    """One KV head of a (batch, kv_heads|1, ...) tensor, keeping a broadcast head dimension as it is."""
    return None if tensor is None else tensor[:, head : head + 1] if tensor.shape[1] > 1 else tensor


@dataclass
class KVView:
    """What a layer reads from the cache.

    keys, values: (batch, kv_heads, slots, head_dim), or packed (batch, 1, slots, Σ widths) under a projection.
    positions: (batch|1, kv_heads|1, slots) original token index of each slot; None: slot i holds token i.
    valid: (batch, kv_heads|1, slots) slots that may be attended to; None: all of them.
    projection: reduced-width bases the keys and values are stored in (see matryoshka_surgery.KVProjection).
    layout: a key naming where positions and valid come from, so layers reading the same layout share one mask.
    rules: what the recipe that built the view adds (`ViewRule`s): more limits on which slots a query reads, or
        weights on the slots.
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    projection: object | None = None
    layout: tuple | None = None
    rules: tuple[ViewRule, ...] = ()

    @property
    def slots(self) -> int:
        return self.keys.shape[-2]

    @property
    def masked(self) -> bool:
        """Whether anything besides plain causality limits which slots a query reads."""
        return self.positions is not None or self.valid is not None or bool(self.rules)

    @property
    def weights(self) -> torch.Tensor | None:
        """(batch, kv_heads, slots) slot weights of a rule that weighs slots (at most one does); None: weight 1."""
        return next((w for w in (rule.slot_weights() for rule in self.rules) if w is not None), None)

    @property
    def rule_key(self) -> tuple:
        return tuple(rule.key for rule in self.rules)

    def kernel_arguments(self) -> dict:
        return {name: value for rule in self.rules for name, value in rule.kernel_arguments().items()}

    def head(self, head: int, key_range: slice, value_range: slice) -> "KVView":
        """One KV head's part of a packed view (its column blocks), for per-head attention."""
        per_head = any(t is not None and t.shape[1] > 1 for t in (self.positions, self.valid))
        layout = (*self.layout, "head", head) if self.layout is not None and per_head else self.layout
        return KVView(self.keys[..., key_range], self.values[..., value_range], pick_head(self.positions, head),
                      pick_head(self.valid, head), layout=layout, rules=tuple(rule.head(head) for rule in self.rules))


@dataclass
class Queries:
    """The queries of one layer call: post-RoPE (batch, heads, q, head_dim) and the token index of each row.

    `newest` is True when the rows are the newest tokens of the sequence, in order, which lets a dense view use
    plain causal attention without building a mask. `softcap`: scaled scores pass through cap · tanh(s / cap)
    (Gemma 2), which SDPA cannot express, so capped attention takes the explicit path or the kernels.
    """

    states: torch.Tensor
    positions: torch.Tensor  # (batch|1, q) long
    newest: bool = True
    masks: dict = field(default_factory=dict)  # additive masks already built this forward, by view layout
    softcap: float | None = None


def soft_cap(values: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap · tanh(values / cap) (Gemma 2's attention scores and final logits); unchanged without a cap."""
    return values if cap is None else torch.tanh(values / cap) * cap


def slot_positions(view: KVView, device: torch.device) -> torch.Tensor:
    """(batch|1, kv_heads|1, slots): the token position of every slot."""
    if view.positions is not None:
        return view.positions
    return torch.arange(view.slots, device=device)[None, None]


def allowed_slots(positions: torch.Tensor, view: KVView, window: int | None) -> torch.Tensor:
    """(batch|1, kv_heads|1, q, slots) bool: causal and windowed by position, and only valid slots."""
    key_positions = slot_positions(view, positions.device)
    query = positions[:, None, :, None]
    keys = key_positions[:, :, None, :]
    allowed = keys <= query
    if window is not None:
        allowed = allowed & (keys > query - window)
    if view.valid is not None:
        allowed = allowed & view.valid[:, :, None, :]
    for rule in view.rules:
        rule_allows = rule.allows(query, keys)
        if rule_allows is not None:
            allowed = allowed & rule_allows
    return allowed


def mask_from_allowed(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def additive_mask(queries: Queries, view: KVView, window: int | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The additive mask of a view, or None where plain causal attention over the slots is exact."""
    window_bites = window is not None and view.slots > window
    if not view.masked and not window_bites and queries.newest and (
            queries.states.shape[2] == 1 or queries.states.shape[2] == view.slots):
        return None
    key = None if view.layout is None else (view.layout, view.slots, window, view.rule_key, dtype)
    if key is not None and key in queries.masks:
        return queries.masks[key]
    mask = mask_from_allowed(allowed_slots(queries.positions, view, window), dtype)
    if key is not None:
        queries.masks[key] = mask
    return mask


def _expand_heads(mask: torch.Tensor | None, heads: int) -> torch.Tensor | None:
    if mask is None or mask.shape[1] in (1, heads):
        return mask
    return mask.repeat_interleave(heads // mask.shape[1], dim=1)


# PyTorch's fused CPU attention, which returns the row log-sum-exp that public SDPA drops: several views then merge
# without float32 score tensors and a softmax written out op by op (bench/results/speed.md, PoD's decode). Private
# API, so only used where it exists; the explicit path below computes the same.
FUSED_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def fused_lse_usable(query: torch.Tensor, view: "KVView") -> bool:
    """On CPU, and never under autograd: the op's backward drops the log-sum-exp's gradient, which a merge needs."""
    return (FUSED_LSE is not None and query.device.type == "cpu" and query.dtype in (torch.float32, torch.bfloat16)
            and not any(t.requires_grad for t in (query, view.keys, view.values)))


def attend_dense(queries: Queries, query: torch.Tensor, view: KVView, scaling: float, implementation: str,
                 window: int | None, dropout: float, need_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Grouped-query attention of (batch, heads, q, d) queries over one full-width view.

    Returns the output (batch, q, heads, d) and, when asked, the row log-sum-exp (batch, heads, q) in float32.
    """
    heads, q_len = query.shape[1], query.shape[2]
    n_rep = heads // view.keys.shape[1]
    mask = _expand_heads(additive_mask(queries, view, window, query.dtype), heads)
    weights = view.weights
    capped = queries.softcap is not None
    if (need_lse and weights is None and not capped and implementation != "eager" and dropout == 0.0
            and fused_lse_usable(query, view)):
        if mask is None and q_len > 1 and q_len != view.slots:  # the fused op's causal flag is top-left aligned
            causal = torch.ones(q_len, view.slots, dtype=torch.bool, device=query.device).tril(view.slots - q_len)
            mask = mask_from_allowed(causal, query.dtype)
        out, lse = FUSED_LSE(query, view.keys, view.values, 0.0, mask is None and q_len > 1, attn_mask=mask,
                             scale=scaling)
        return out.transpose(1, 2), lse
    if need_lse or implementation == "eager" or weights is not None or capped:
        precise = torch.promote_types(query.dtype, torch.float32)  # softmax statistics in fp32 or better
        scores = soft_cap(grouped(torch.matmul, query, view.keys.transpose(2, 3)).to(precise) * scaling, queries.softcap)
        if mask is not None:
            scores = scores + mask
        elif q_len > 1:
            causal = torch.ones(q_len, view.slots, dtype=torch.bool, device=scores.device).tril(view.slots - q_len)
            scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        if weights is not None:
            probs, lse = weighted_softmax(scores, slot_weights(queries, view, weights, heads))
        else:
            lse = torch.logsumexp(scores, dim=-1)
            probs = torch.exp(scores - lse[..., None])
        out = grouped(torch.matmul, F.dropout(probs.to(query.dtype), p=dropout), view.values)
        return out.transpose(1, 2), lse if need_lse else None
    is_causal = mask is None and q_len > 1
    out = F.scaled_dot_product_attention(query, view.keys, view.values, attn_mask=mask, dropout_p=dropout,
                                         is_causal=is_causal, scale=scaling, enable_gqa=n_rep > 1)
    return out.transpose(1, 2), None


def grouped(op, rows: torch.Tensor, per_kv_head: torch.Tensor) -> torch.Tensor:
    """`op(rows, per_kv_head)` for (batch, heads, q, ·) rows against (batch, kv_heads, ·, ·) operands, each query head
    paired with its KV head (head h with KV head h // group) by folding a group's heads into the row dimension: no
    copy of the keys or values per query head, which would cost a pass over the whole cache per decode step."""
    batch, heads, q_len = rows.shape[:3]
    kv_heads = per_kv_head.shape[1]
    if kv_heads == heads:
        return op(rows, per_kv_head)
    folded = op(rows.reshape(batch, kv_heads, heads // kv_heads * q_len, rows.shape[-1]), per_kv_head)
    return folded.reshape(batch, heads, q_len, folded.shape[-1])


def slot_weights(queries: Queries, view: KVView, weights: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, heads, q, slots): each slot's weight for each query row; a slot's own query sees it at weight 1."""
    own = queries.positions[:, None, :, None] == slot_positions(view, queries.positions.device)[:, :, None, :]
    weights = torch.where(own, torch.ones_like(weights[:, :, None, :]), weights[:, :, None, :])
    return _expand_heads(weights, heads)


def weighted_softmax(scores: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """p_j = w_j·exp(s_j) / Σ_k w_k·exp(s_k) and its log-normaliser. With 0/1 weights this is the masked softmax;
    with straight-through weights (hard forward, soft backward) a zero-weight slot still passes a gradient to its
    weight: ∂p/∂w_j = exp(s_j − lse)·(...), which is how an evicted token can learn to come back."""
    peak = scores.amax(-1, keepdim=True).detach()
    mass = torch.exp(scores - peak) * weights
    total = mass.sum(-1, keepdim=True)
    return mass / total, (peak + torch.log(total))[..., 0]


def merge(first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor]):
    """Join two partial attentions over disjoint key sets: weights exp(lse_i − lse) make the softmax of the union."""
    (out_a, lse_a), (out_b, lse_b) = first, second
    lse = torch.logaddexp(lse_a, lse_b)
    weight_a = torch.exp(lse_a - lse).transpose(1, 2)[..., None]
    weight_b = torch.exp(lse_b - lse).transpose(1, 2)[..., None]
    precise = torch.promote_types(out_a.dtype, torch.float32)
    out = out_a.to(precise) * weight_a + out_b.to(precise) * weight_b
    return out.to(out_a.dtype), lse


def use_kernels(implementation: str, query: torch.Tensor) -> bool:
    return implementation == TRITON_IMPLEMENTATION and decode_attention is not None and kernels_usable(query)


def kernel_valid(view: KVView, kv_heads: int) -> torch.Tensor | None:
    """(batch, kv_heads, slots) slots a kernel may read."""
    if view.valid is None:
        return None
    return view.valid.expand(-1, kv_heads, -1) if view.valid.shape[1] != kv_heads else view.valid


def attend_view(queries: Queries, view: KVView, scaling: float, implementation: str, window: int | None = None,
                dropout: float = 0.0, need_lse: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention over one view, on the Triton kernels where they apply, else in PyTorch."""
    query = queries.states
    window_bites = window is not None and view.slots > window
    if use_kernels(implementation, query) and not window_bites and view.weights is None:  # kernels have no backward
        return attend_kernels(queries, view, scaling)
    if view.projection is not None:
        return view.projection.attend(queries, view, scaling, implementation, window, dropout, need_lse)
    return attend_dense(queries, query, view, scaling, implementation, window, dropout, need_lse)


def attend_kernels(queries: Queries, view: KVView, scaling: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton path: decode kernel for one query row, prefill kernel (with its log-sum-exp) otherwise."""
    query = queries.states
    if view.projection is not None:
        return view.projection.attend_kernels(queries, view, scaling)
    kv_heads = view.keys.shape[1]
    valid = kernel_valid(view, kv_heads)
    if query.shape[2] == 1 and queries.newest:  # every cached slot precedes the newest token
        if view.rules:  # one query: what it may read is a plain mask
            allowed = allowed_slots(queries.positions[:, -1:], view, None)[:, :, 0]
            valid = allowed.expand(query.shape[0], kv_heads, -1)
        out, lse = decode_attention(query[:, :, 0], view.keys, view.values, scaling, valid=valid, return_lse=True,
                                    softcap=queries.softcap)
        return out[:, None], lse[..., None]
    # slot order stands for token order only in a dense view; otherwise the kernel compares positions
    by_position = not queries.newest or view.positions is not None
    out, lse = prefill_attention(query, view.keys, view.values, scaling, valid=valid,
                                 query_positions=queries.positions if by_position else None,
                                 key_positions=view.positions, softcap=queries.softcap, **view.kernel_arguments())
    return out.transpose(1, 2), lse


def explicit_mask(queries: Queries, view: KVView, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """A view's additive mask, built even where plain causal attention would not need one."""
    mask = additive_mask(queries, view, window, dtype)
    return mask if mask is not None else mask_from_allowed(allowed_slots(queries.positions, view, window), dtype)


QUERY_BLOCK = 256  # query rows per block when a long prefill attends block by block


def shared_positions(view: KVView) -> torch.Tensor | None:
    """(batch|1, slots) key positions, the same for every head; None when they differ per head."""
    if view.positions is None:
        return torch.arange(view.slots, device=view.keys.device)[None]
    return view.positions[:, 0] if view.positions.shape[1] == 1 else None


def reachable(view: KVView, positions: torch.Tensor, first: int, last: int, window: int | None) -> KVView | None:
    """The part of `view` the queries at positions first..last can reach: causally, within the window, and within
    every rule's key ranges. A superset is safe (the mask stays exact); None when nothing is reachable."""
    ranges = [(first - window + 1 if window is not None else -2**62, last)]
    for rule in view.rules:
        bounds = rule.key_ranges(first, last)
        if bounds is not None:
            ranges = [(max(lo, b_lo), min(hi, b_hi)) for lo, hi in ranges for b_lo, b_hi in bounds
                      if max(lo, b_lo) <= min(hi, b_hi)]
    keep = torch.zeros_like(positions, dtype=torch.bool)
    for lo, hi in ranges:
        keep |= (positions >= lo) & (positions <= hi)
    index = keep.any(0).nonzero().squeeze(-1)  # a slot any sequence may reach: a superset for the others
    if index.numel() == 0:
        return None
    if int(index[-1] - index[0]) + 1 == index.numel():  # one run of slots: views, not copies
        cut = slice(int(index[0]), int(index[-1]) + 1)
        pick = lambda t: t[:, :, cut]  # noqa: E731
    else:
        pick = lambda t: t.index_select(2, index)  # noqa: E731
    valid = None if view.valid is None else pick(view.valid[..., None])[..., 0]
    return KVView(pick(view.keys), pick(view.values), positions[:, index][:, None], valid, view.projection, None,
                  view.rules)


def tileable(queries: Queries, views: list[KVView]) -> bool:
    """A prefill long enough to attend by query blocks, over views whose slots keep one position per slot across
    heads. (A decode step is not tiled: in one run on the demo model at 2k tokens, finding the reachable slots each
    step cost more than it saved; bench/results/pod_prefill_tiling.md.)"""
    rows = queries.states.shape[2]
    return (queries.newest and rows > 2 * QUERY_BLOCK and queries.positions.shape[0] == 1
            and all(not rule.per_slot for view in views for rule in view.rules)
            and all(shared_positions(view) is not None for view in views))


def attend_tiled(queries: Queries, views: list[KVView], scaling: float, window: int | None,
                 dropout: float) -> torch.Tensor:
    """`attend_union`, one block of query rows at a time, each over only the slot ranges it can reach (causality,
    the window, the views' rules: PoD's distant view ends `recent` tokens before the block, its proximal view is the
    sinks and the block's recent window). The same softmax as over every slot, at about the cost of causal attention
    instead of full attention over every view."""
    positions = [shared_positions(view) for view in views]
    outputs = []
    for start in range(0, queries.states.shape[2], QUERY_BLOCK):
        rows = slice(start, start + QUERY_BLOCK)
        block = Queries(queries.states[:, :, rows], queries.positions[:, rows], newest=False, softcap=queries.softcap)
        first, last = int(block.positions[0, 0]), int(block.positions[0, -1])
        parts = [part for view, where in zip(views, positions)
                 if (part := reachable(view, where, first, last, window)) is not None]
        outputs.append(attend_union(block, parts, scaling, window, dropout))
    return torch.cat(outputs, dim=1)


def attend_union(queries: Queries, views: list[KVView], scaling: float, window: int | None,
                 dropout: float) -> torch.Tensor:
    """One SDPA call over the concatenated views: its softmax over the union of their slots is exactly what merging
    the views' partial attentions by log-sum-exp computes, without the float32 score tensors that the log-sum-exp
    needs (about 3× faster on CPU). The keys and values are a transient copy."""
    query = queries.states
    heads = query.shape[1]
    layouts = tuple(view.layout for view in views)
    key = ("union", layouts, tuple(view.slots for view in views), window, tuple(view.rule_key for view in views),
           query.dtype)
    mask = queries.masks.get(key) if None not in layouts else None
    if mask is None:
        parts = [explicit_mask(queries, view, window, query.dtype) for view in views]
        batch = max(part.shape[0] for part in parts)
        kv_heads = max(part.shape[1] for part in parts)
        mask = torch.cat([part.expand(batch, kv_heads, -1, -1) for part in parts], dim=-1)
        mask = _expand_heads(mask, heads)
        if None not in layouts:
            queries.masks[key] = mask
    keys = torch.cat([view.keys for view in views], dim=2)
    values = torch.cat([view.values for view in views], dim=2)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                         enable_gqa=heads != keys.shape[1])
    return out.transpose(1, 2)


def attend(queries: Queries, views: list[KVView], scaling: float, implementation: str, window: int | None = None,
           dropout: float = 0.0, need_lse: bool = False,
           skip=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of `queries` over the union of `views`; (batch, q, heads, d) and the row log-sum-exp if asked
    for (always computed when several views merge). With `skip`, the last of several views is dropped for the
    rows the earlier views already hold: `skip` counts each view's allowed slots (`count`) and empties the rows to
    drop from the last view's partial result (`apply`), as PoD's `DistantSkip` does."""
    kernels = use_kernels(implementation, queries.states)
    # A view that is not a KVView attends itself (`partial`: output and lse) or, for the kernels, becomes one
    # (`joined`): an Attention-Gate's heads that each keep their own count of slots.
    views = [view.joined() if not isinstance(view, KVView) and kernels else view for view in views]
    if not all(isinstance(view, KVView) for view in views):
        return merge_views(queries, views, scaling, implementation, window, dropout, None)
    slots = skip.count(queries, views, window) if skip is not None else None
    if len(views) == 1:
        return attend_view(queries, views[0], scaling, implementation, window, dropout, need_lse)
    one_row = queries.states.shape[2] == 1  # a decode step: merging costs nothing, concatenating copies the cache
    if (slots is None and not need_lse and not one_row and implementation != "eager" and queries.softcap is None
            and not kernels and all(view.projection is None for view in views)):
        if tileable(queries, views):
            return attend_tiled(queries, views, scaling, window, dropout), None
        return attend_union(queries, views, scaling, window, dropout), None
    return merge_views(queries, views, scaling, implementation, window, dropout, (skip, slots) if skip else None)


def merge_views(queries: Queries, views: list, scaling: float, implementation: str, window: int | None,
                dropout: float, skip) -> tuple[torch.Tensor, torch.Tensor]:
    """Each view's partial attention with its log-sum-exp, merged; `skip` (rule, slots) may empty rows of the last."""
    result = None
    for index, view in enumerate(views):
        if not isinstance(view, KVView):
            part = view.partial(queries, scaling, implementation, window, dropout)
        else:
            part = attend_view(queries, view, scaling, implementation, window, dropout, need_lse=True)
        if skip is not None and index == len(views) - 1:
            part = skip[0].apply(result, part, skip[1][index], queries.states.shape[-1])
        result = part if result is None else merge(result, part)
    return result


def registry_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """`surgery_triton` as transformers' attention registry sees it (SDPA); the model dispatches to the kernels."""
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         is_causal=attention_mask is None and query.shape[2] > 1, scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2), None


def register_with_transformers() -> None:
    """The public registries through which `attn_implementation="surgery_triton"` is accepted by transformers.

    Registering a mask function too makes transformers pass the padding mask through, as it does for SDPA.
    """
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask  # public module; the mask format our kernels' fallback uses

    AttentionInterface.register(TRITON_IMPLEMENTATION, registry_attention)
    AttentionMaskInterface.register(TRITON_IMPLEMENTATION, sdpa_mask)


register_with_transformers()
