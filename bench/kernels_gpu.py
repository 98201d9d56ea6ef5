"""Triton kernels vs torch on a GPU: decode over full, reduced-width and ragged caches, and causal prefill.

Writes bench/results/kernels_gpu.md. Needs CUDA:

    python bench/kernels_gpu.py                 # Llama-2-7B-like heads (32 query, 8 KV in the GQA rows, d=128)
    TRITON_INTERPRET=1 python bench/kernels_gpu.py --smoke   # tiny shapes on CPU, only to check it runs

Decode is memory bound, so each row reports the K/V bytes the kernel must read divided by its time, as a fraction
of the device's measured copy bandwidth (a device-to-device copy of 1 GiB). Baselines: torch SDPA on the dense
equivalent (GQA via enable_gqa), and for ragged caches gather-the-kept-slots-then-SDPA.
"""

import argparse
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

from surgery.kernels.decode_surgery import decode_attention
from surgery.kernels.prefill_surgery import prefill_attention

RESULTS = Path(__file__).parent / "results" / "kernels_gpu.md"


def timed(fn, repeat: int) -> float:
    """Median seconds per call, CUDA events when on GPU."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        times = []
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        return sorted(times)[len(times) // 2]
    import time

    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device, size: int) -> float:
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = timed(lambda: target.copy_(source), 10)
    return 2 * size / seconds  # read + write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,32768,131072")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, for a CPU run under TRITON_INTERPRET=1")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        raise SystemExit("no CUDA device: run on a GPU, or pass --smoke with TRITON_INTERPRET=1 to check the script")
    if args.smoke:
        args.lengths, args.heads, args.kv_heads, args.head_dim, args.repeat = "64", 4, 2, 16, 1
    dtype = getattr(torch, args.dtype)
    lengths = [int(n) for n in args.lengths.split(",")]
    batch, heads, kv_heads, dim = args.batch, args.heads, args.kv_heads, args.head_dim
    bandwidth = copy_bandwidth(device, 2**30 if not args.smoke else 2**16)
    scale = dim**-0.5
    rows = []

    def row(kind, length, layout, seconds, baseline, baseline_name, bytes_read):
        achieved = bytes_read / seconds
        rows.append(f"| {kind} | {length:,} | {layout} | {seconds * 1e6:,.1f} | {baseline * 1e6:,.1f} ({baseline_name}) | "
                    f"{baseline / seconds:.2f}× | {achieved / 1e9:,.1f} | {achieved / bandwidth:.0%} |")

    for length in lengths:
        query = torch.randn(batch, heads, dim, device=device, dtype=dtype)
        keys = torch.randn(batch, kv_heads, length, dim, device=device, dtype=dtype)
        values = torch.randn_like(keys)
        element = keys.element_size()
        sdpa = lambda: F.scaled_dot_product_attention(query[:, :, None], keys, values, scale=scale, enable_gqa=True)  # noqa: E731
        full_bytes = 2 * batch * kv_heads * length * dim * element
        row("decode", length, "full", timed(lambda: decode_attention(query, keys, values, scale), args.repeat),
            timed(sdpa, args.repeat), "SDPA", full_bytes)

        ranks = [dim // 2] * kv_heads  # MatryoshkaKV at a 50% budget
        packed_k = torch.randn(batch, 1, length, sum(ranks), device=device, dtype=dtype)
        packed_v = torch.randn_like(packed_k)
        reduced_query = torch.randn(batch, heads, dim // 2, device=device, dtype=dtype)
        row("decode", length, "reduced width (50%)",
            timed(lambda: decode_attention(reduced_query, packed_k, packed_v, scale, None, ranks, ranks), args.repeat),
            timed(sdpa, args.repeat), "SDPA full width", full_bytes // 2)

        kept = max(1, length // 5)  # eviction to 20%, compact per head, some slots invalid
        compact_k = torch.randn(batch, kv_heads, kept, dim, device=device, dtype=dtype)
        compact_v = torch.randn_like(compact_k)
        valid = torch.rand(batch, kv_heads, kept, device=device) > 0.05
        index = torch.randint(0, length, (batch, kv_heads, kept), device=device)

        def gather_then_sdpa():
            gathered_k = keys.gather(2, index[..., None].expand(-1, -1, -1, dim))
            gathered_v = values.gather(2, index[..., None].expand(-1, -1, -1, dim))
            return F.scaled_dot_product_attention(query[:, :, None], gathered_k, gathered_v, scale=scale,
                                                  enable_gqa=True)

        row("decode", length, "ragged (20% kept)",
            timed(lambda: decode_attention(query, compact_k, compact_v, scale, valid=valid), args.repeat),
            timed(gather_then_sdpa, args.repeat), "gather + SDPA", 2 * batch * kv_heads * kept * dim * element)

    for length in [n for n in lengths if n <= 32768]:
        query = torch.randn(batch, heads, length, dim, device=device, dtype=dtype)
        keys = torch.randn(batch, kv_heads, length, dim, device=device, dtype=dtype)
        values = torch.randn_like(keys)
        triton_s = timed(lambda: prefill_attention(query, keys, values, scale), max(1, args.repeat // 4))
        sdpa_s = timed(lambda: F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale,
                                                              enable_gqa=True), max(1, args.repeat // 4))
        row("prefill", length, "full, causal", triton_s, sdpa_s, "SDPA", 2 * batch * kv_heads * length * dim * element)

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "CPU (interpreter)"
    lines = [
        "# Triton kernels vs torch",
        "",
        f"Generated by `python bench/kernels_gpu.py` on {name}, torch {torch.__version__}, {args.dtype}, batch {batch}, "
        f"{heads} query heads, {kv_heads} KV heads, head_dim {dim}. Measured copy bandwidth: {bandwidth / 1e9:,.0f} GB/s.",
        "",
        "| kernel | cache tokens | layout | Triton µs | baseline µs | speed-up | K/V GB/s | of copy bandwidth |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    if args.smoke:
        lines.insert(2, "**Smoke run on CPU under the Triton interpreter: the numbers mean nothing.**\n")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    (RESULTS.with_name("kernels_gpu_smoke.md") if args.smoke else RESULTS).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
