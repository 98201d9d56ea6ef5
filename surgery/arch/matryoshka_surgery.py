"""MatryoshkaKV (Lin et al., arXiv 2410.14731) at run time: per-KV-head orthogonal bases applied after RoPE.

k̃ = (RoPE(k) − μ_K)·U_K[:, :r_k] and ṽ = (v − μ_V)·U_V[:, :r_v] are cached, packed head after head along the last
dim, so a layer's cache is exactly Σ r_k + Σ r_v wide. Attention uses q̃ = RoPE(q)·U_K[:, :r_k] and returns
softmax(q̃·k̃ᵀ·scale)·ṽ·U_V[:, :r_v]ᵀ + μ_V. The paper's extra score term RoPE(q)·μ_Kᵀ is the same for every key
of a query, so softmax cancels it and it is not computed. Bases are per KV head (not per query head as in the
official code), so a GQA model keeps its GQA saving. Because the back-projection is affine and attention weights
sum to one, outputs of several views merge by log-sum-exp after it, exactly.

Shipped flat inside every checkpoint: imports torch only (and the attention core beside it).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .attention_surgery import (KVView, Queries, additive_mask, attend_dense, decode_attention, grouped,
                               kernel_valid, prefill_attention, soft_cap)
from .runtime_surgery import Runtime


class HeadBasis(nn.Module):
    """Orthonormal columns (head_dim × stored rank) of one KV head's basis; the first `rank` columns are used.

    `rank` can be lowered at run time, which is how the rank search and Matryoshka training try smaller ranks.
    """

    def __init__(self, head_dim: int, rank: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(head_dim, rank))
        self.rank = rank

    def forward(self) -> torch.Tensor:
        return self.weight[:, : self.rank]


class KVProjection(nn.Module):
    """One layer's key and value bases and means, one basis per KV head."""

    def __init__(self, head_dim: int, key_ranks: list[int], value_ranks: list[int]):
        super().__init__()
        self.key_bases = nn.ModuleList(HeadBasis(head_dim, r) for r in key_ranks)
        self.value_bases = nn.ModuleList(HeadBasis(head_dim, r) for r in value_ranks)
        self.key_mean = nn.Parameter(torch.zeros(len(key_ranks), head_dim))
        self.value_mean = nn.Parameter(torch.zeros(len(value_ranks), head_dim))

    @property
    def key_ranks(self) -> list[int]:
        return [basis.rank for basis in self.key_bases]

    @property
    def value_ranks(self) -> list[int]:
        return [basis.rank for basis in self.value_bases]

    @property
    def widths(self) -> tuple[list[int], list[int]]:
        return self.key_ranks, self.value_ranks

    def compress(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, kv_heads, seq, head_dim) post-RoPE keys and values -> packed (batch, 1, seq, Σ rank)."""
        keys = [(key[:, h] - self.key_mean[h]) @ basis() for h, basis in enumerate(self.key_bases)]
        values = [(value[:, h] - self.value_mean[h]) @ basis() for h, basis in enumerate(self.value_bases)]
        return torch.cat(keys, dim=-1).unsqueeze(1), torch.cat(values, dim=-1).unsqueeze(1)

    def _head_blocks(self):
        key_offset = value_offset = 0
        for h, (key_basis, value_basis) in enumerate(zip(self.key_bases, self.value_bases)):
            u_k, u_v = key_basis(), value_basis()
            yield h, u_k, u_v, slice(key_offset, key_offset + u_k.shape[1]), slice(value_offset, value_offset + u_v.shape[1])
            key_offset, value_offset = key_offset + u_k.shape[1], value_offset + u_v.shape[1]

    def attend(self, queries: Queries, view: KVView, scaling: float, implementation: str, window: int | None,
               dropout: float, need_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of (batch, heads, q, head_dim) queries over the packed view, head by head, in PyTorch."""
        query = queries.states
        group = query.shape[1] // len(self.key_bases)
        if query.shape[2] == 1 and view.weights is None and dropout == 0.0:
            out, lse = self.attend_packed(queries, view, scaling, window, group)
            return out, lse if need_lse else None
        outputs, lses = [], []
        for h, u_k, u_v, key_range, value_range in self._head_blocks():
            reduced_query = query[:, h * group : (h + 1) * group] @ u_k
            head = view.head(h, key_range, value_range)
            # The head's strided column blocks, made whole and zero-padded to one width (a copy of O(n·r) beside
            # attention's O(n²·r)): SDPA's fused kernel wants contiguous operands of one head width, and falls
            # back to materialising every score otherwise (3× the prefill time when r_k ≠ r_v, measured).
            width = max(u_k.shape[1], u_v.shape[1])
            reduced_query, head.keys, head.values = (F.pad(t, (0, width - t.shape[-1])).contiguous()
                                                     for t in (reduced_query, head.keys, head.values))
            out, lse = attend_dense(queries, reduced_query, head, scaling, implementation, window, dropout, need_lse)
            outputs.append(out[..., : u_v.shape[1]] @ u_v.T + self.value_mean[h])
            lses.append(lse)
        return torch.cat(outputs, dim=2), torch.cat(lses, dim=1) if need_lse else None

    def attend_packed(self, queries: Queries, view: KVView, scaling: float, window: int | None,
                      group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One query row against the packed cache as it is stored: each head's reduced query sits in its own
        column block of an otherwise zero row, so one product with the packed keys gives every head's scores
        (the zeros meet the other heads' columns), and one product of the probabilities with the packed values
        holds every head's output in its own block. It reads the cache once, where attending head by head over
        strided column slices of it cost 3× the time of the full-width cache (bench/results/speed.md)."""
        query = queries.states
        batch, heads, _, dim = query.shape
        kv_heads = len(self.key_bases)
        to_keys, from_values = self.block_diagonal()
        reduced = (query.view(batch, kv_heads, group, 1, dim) @ to_keys[:, None]).view(batch, heads, 1, -1)
        precise = torch.promote_types(query.dtype, torch.float32)
        scores = soft_cap(grouped(torch.matmul, reduced, view.keys.transpose(2, 3)).to(precise) * scaling, queries.softcap)
        mask = additive_mask(queries, view, window, query.dtype)
        if mask is not None:
            scores = scores + (mask.repeat_interleave(group, dim=1) if mask.shape[1] not in (1, heads) else mask)
        lse = torch.logsumexp(scores, dim=-1)
        packed = grouped(torch.matmul, torch.exp(scores - lse[..., None]).to(query.dtype), view.values)
        out = packed.view(batch, kv_heads, group, 1, -1) @ from_values[:, None] + self.value_mean[:, None, None]
        return out.view(batch, heads, 1, dim).transpose(1, 2), lse

    def block_diagonal(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(kv_heads, d, Σ r_k) and (kv_heads, Σ r_v, d): head h's key basis in its own column block, its value
        basis transposed in its own row block, zeros elsewhere. One product then projects every head's query
        into the packed key space, one projects the packed output back. Kept between decode steps while the
        bases and ranks stay as they are (inference); rebuilt under autograd."""
        key = tuple((b.weight.data_ptr(), b.weight._version, b.rank) for b in (*self.key_bases, *self.value_bases))
        cached = getattr(self, "_blocks", None)
        if cached is not None and cached[0] == key and not torch.is_grad_enabled():
            return cached[1]
        weight = self.key_bases[0].weight
        kv_heads, dim = len(self.key_bases), weight.shape[0]
        to_keys = weight.new_zeros(kv_heads, dim, sum(self.key_ranks))
        from_values = weight.new_zeros(kv_heads, sum(self.value_ranks), dim)
        for h, u_k, u_v, key_range, value_range in self._head_blocks():
            to_keys[h, :, key_range] = u_k
            from_values[h, value_range] = u_v.T
        if not torch.is_grad_enabled():
            self._blocks = (key, (to_keys, from_values))
        return to_keys, from_values

    def attend_kernels(self, queries: Queries, view: KVView, scaling: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The Triton kernels on the packed reduced cache; returns (batch, q, heads, head_dim) and the lse."""
        query = queries.states
        batch, heads, q_len, _ = query.shape
        group = heads // len(self.key_bases)
        reduced = query.new_zeros(batch, heads, q_len, max(self.key_ranks))
        for h, basis in enumerate(self.key_bases):
            reduced[:, h * group : (h + 1) * group, :, : basis.rank] = query[:, h * group : (h + 1) * group] @ basis()
        valid = kernel_valid(view, len(self.key_bases))
        lse = None
        if q_len == 1 and queries.newest:
            out = decode_attention(reduced[:, :, 0], view.keys, view.values, scaling, valid, *self.widths,
                                   softcap=queries.softcap)[:, :, None]
        else:
            out, lse = prefill_attention(reduced, view.keys, view.values, scaling, valid, *self.widths,
                                         query_positions=None if queries.newest else queries.positions,
                                         key_positions=view.positions, softcap=queries.softcap,
                                         **view.kernel_arguments())
        heads_out = [out[:, h * group : (h + 1) * group, :, : basis.rank] @ basis().T + self.value_mean[h]
                     for h, basis in enumerate(self.value_bases)]
        return torch.cat(heads_out, dim=1).transpose(1, 2), lse


def set_kv_ranks(model, key_ranks: list[list[int] | None], value_ranks: list[list[int] | None]) -> None:
    """Project (or stop projecting) each layer's K/V at the given per-head ranks, in place (rank search, training).

    A layer without a projection gets full-rank identity bases first; a rank can only go down to what is stored.
    """
    for layer, keys, values in zip(model.model.layers, key_ranks, value_ranks):
        attention = layer.self_attn
        if keys is None:
            attention.kv_projection = None
            continue
        if getattr(attention, "kv_projection", None) is None:
            full = [attention.head_dim] * attention.num_kv_heads
            weight = attention.q_proj.weight
            attention.kv_projection = KVProjection(attention.head_dim, full, full).to(weight.device, weight.dtype)
        for bases, ranks in ((attention.kv_projection.key_bases, keys), (attention.kv_projection.value_bases, values)):
            for basis, rank in zip(bases, ranks):
                if not 0 < rank <= basis.weight.shape[1]:
                    raise ValueError(f"rank {rank} is outside 1..{basis.weight.shape[1]} (what the basis stores)")
                basis.rank = rank
    model.config.matryoshka_key_ranks = [None if r is None else list(r) for r in key_ranks]
    model.config.matryoshka_value_ranks = [None if r is None else list(r) for r in value_ranks]


class MatryoshkaRuntime(Runtime):
    """Each K/V-owning layer with ranks caches its keys and values in its reduced-width bases."""

    module = "matryoshka"

    def build_attention(self, attention, config) -> None:
        ranks = config.projected_ranks(attention.layer_idx) if attention.owns_kv else None
        if ranks:
            attention.kv_projection = KVProjection(attention.head_dim, *ranks)


RUNTIME = MatryoshkaRuntime()

__all__ = ["RUNTIME", "HeadBasis", "KVProjection", "set_kv_ranks"]
