"""What the machine can do at best, so a latency ratio can be read against a ceiling.

Why this exists: two compilers that run the same oneDNN convolutions at the same
efficiency cannot differ by 10 % on a compute-bound net. To tell "fusepass is slower
than it could be" from "nobody can be faster here", the bench records
  * each model's arithmetic (``torch.utils.flop_counter.FlopCounterMode`` over one eager
    forward: convolutions, matmuls, attention), and
  * the machine's measured fp32 peak: the best of a large sgemm and a large oneDNN
    convolution with the bench's thread count,
and the report shows the GFLOP/s each config reaches and what share of that peak a
target would need. ``python -m bench.ceiling`` prints the peak as JSON.

Imported by workers in the IPEX env too (torch 2.8 has FlopCounterMode).
"""
from __future__ import annotations

import json
import sys
import time

import torch


def model_gflop(model, inputs) -> float:
    """GFLOP of one forward (a multiply-add counts 2), as torch's flop counter sees it."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops() / 1e9


def _best_gflops(fn, flop: float, reps: int = 5, rounds: int = 3) -> float:
    fn()  # first call: allocation, primitive creation
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return flop / best / 1e9


def peak_gflops(threads: int = 2) -> dict:
    """fp32 GFLOP/s of a 2048^3 sgemm and of a 3x3 conv (bs 8, 256 channels, 28x28,
    channels-last, prepacked weight: a shape oneDNN runs at its best)."""
    torch.set_num_threads(threads)
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    sgemm = _best_gflops(lambda: torch.mm(a, b), 2.0 * n ** 3)
    out = {"threads": threads, "sgemm_gflops": round(sgemm, 1)}
    if torch.backends.mkldnn.is_available():
        x = torch.randn(8, 256, 28, 28).contiguous(memory_format=torch.channels_last)
        w = torch.randn(256, 256, 3, 3)
        args = ([1, 1], [1, 1], [1, 1], 1)
        wp = torch.ops.mkldnn._reorder_convolution_weight(w, *args, list(x.shape))
        flop = 2.0 * 8 * 256 * 28 * 28 * 256 * 9
        with torch.no_grad():
            conv = _best_gflops(lambda: torch.ops.mkldnn._convolution_pointwise(
                x, wp, None, *args, "none", [], None), flop)
        out["conv_gflops"] = round(conv, 1)
    out["peak_gflops"] = max(v for k, v in out.items() if k.endswith("_gflops"))
    return out


if __name__ == "__main__":
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    print(json.dumps(peak_gflops(threads)))
