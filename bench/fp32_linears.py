"""Stock torch's fp32 GEMMs on BERT-base's linear shapes: which is fastest on this CPU.

Why: on AVX2, OpenVINO and ORT beat fusepass on BERT in the linears (MLAS sgemm against
oneDNN's ``brg_matmul``; bench/README "fp32 on AVX2"). This asks whether a kernel stock
torch already ships would do better than the one fusepass lowers to: oneDNN's
``mkldnn._linear_pointwise`` on a prepacked weight (fusepass), MKL's packed sgemm
``mkl._mkl_linear`` (Inductor-freezing's fp32 linear) and ``addmm`` (MKL sgemm, unpacked).
M = 128 (seq 128, bs 1); interleaved rounds, medians of wall and process CPU time, the
latter summed over the model's 72 linears (48 768->768, 12 768->3072, 12 3072->768).

    python -m bench.fp32_linears --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = [(768, 768, 48), (768, 3072, 12), (3072, 768, 12)]  # (in, out, count in BERT-base)


def kernels(k, n, m):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * k ** -0.5
    b = torch.randn(n, generator=g)
    pw = torch.ops.mkldnn._reorder_linear_weight(w, m)
    mw = torch.ops.mkl._mkl_reorder_linear_weight(w, m)
    fns = {"onednn": lambda: torch.ops.mkldnn._linear_pointwise(x, pw, b, "none", [], ""),
           "mkl_packed": lambda: torch.ops.mkl._mkl_linear(x, mw, w, b, m),
           "addmm": lambda: torch.addmm(b, x, w.t())}
    ref = torch.nn.functional.linear(x, w, b)
    for fn in fns.values():
        torch.testing.assert_close(fn(), ref, rtol=1e-4, atol=1e-4)
    return fns


def _time(fn, seconds):
    for _ in range(3):
        fn()
    ws, cs, end = [], [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(ws) < 5:
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        ws.append(time.perf_counter() - t0)
        cs.append(time.process_time() - c0)
    return statistics.median(ws) * 1e3, statistics.median(cs) * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.fp32_linears", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=0.4)
    p.add_argument("--m", type=int, default=128)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from bench.int8_kernels import cpu_flags
    cpu, flags = cpu_flags()
    print(f"CPU: {cpu}; flags: {' '.join(flags)}; torch {torch.__version__}; {a.threads} threads; M={a.m}")
    total = {}
    for k, n, count in SHAPES:
        fns = kernels(k, n, a.m)
        got = {name: [] for name in fns}
        for r in range(a.rounds):
            for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                got[name].append(_time(fns[name], a.seconds))
        cells = []
        for name, v in got.items():
            wall, cpu_ms = statistics.median(x for x, _ in v), statistics.median(c for _, c in v)
            total.setdefault(name, [0.0, 0.0])
            total[name][0] += wall * count
            total[name][1] += cpu_ms * count
            cells.append(f"{name} wall {wall:.3f} cpu {cpu_ms:.3f}")
        print(f"{k}->{n} x{count}: " + ", ".join(cells), flush=True)
    for name, (wall, cpu_ms) in total.items():
        print(f"{name}: x count wall {wall:.1f} ms, process CPU {cpu_ms:.1f} ms")


if __name__ == "__main__":
    main()
