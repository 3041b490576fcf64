"""`make demo`: compile a real model with backend="fusepass", show what was fused, and
measure the speedup over eager (interleaved rounds, medians; same process, same run).

    python -m bench.demo [--model resnet50] [--batch 1] [--rounds 30] [--full-report]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import fusepass
from bench import zoo as models


def _time(fn, x):
    t = time.perf_counter()
    fn(x)
    return time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50", choices=sorted(models.MODELS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--full-report", action="store_true", help="print every decision")
    args = ap.parse_args(argv)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.model} (random weights, re-initialized), batch {args.batch}")
    model = models.build(args.model)
    x = models.example_input(args.model, args.batch)

    with torch.no_grad():
        want = model(x)
        compiled = torch.compile(model, backend="fusepass")
        t = time.perf_counter()
        got = compiled(x)
        compile_s = time.perf_counter() - t
    report = fusepass.explain(model, x)

    print(f"\ncompiled in {compile_s:.2f} s (dynamo + fusepass, first call)\n")
    print(report if args.full_report else _tables(report))
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    print(f"\nmax abs error vs eager: {err:.2e} (output scale {scale:.2f})")

    with torch.no_grad():
        for _ in range(3):
            model(x), compiled(x)
        eager, fused = [], []
        for _ in range(args.rounds):  # interleaved, so drift hits both alike
            eager.append(_time(model, x))
            fused.append(_time(compiled, x))
    me, mf = statistics.median(eager), statistics.median(fused)
    print(f"eager    median {me * 1e3:8.2f} ms")
    print(f"fusepass median {mf * 1e3:8.2f} ms")
    print(f"speedup over eager: {me / mf:.2f}x  ({args.rounds} interleaved rounds)")


def _tables(report) -> str:
    out = ["what was rewritten (pattern row: count)"]
    out += [f"  {k:<28} {v:>4}" for k, v in sorted(report.counts.items())] or ["  (nothing)"]
    other = {k: v for k, v in report.rewrites.items() if k not in report.counts}
    if other:
        out.append("other rewrites (layout regions, prepacked weights)")
        out += [f"  {k:<28} {v:>4}" for k, v in sorted(other.items())]
    out.append("kernels chosen (kernel: count)")
    out += [f"  {k:<40} {v:>4}" for k, v in sorted(report.kernels.items())] or ["  (none)"]
    declined = {}
    for d in report.declined:
        declined[(d.rule, d.reason)] = declined.get((d.rule, d.reason), 0) + 1
    if declined:
        out.append("declined (pattern row: reason x count)")
        out += [f"  {r}: {why} x{n}" for (r, why), n in sorted(declined.items())]
    other = [d for d in report.decisions if d.action in ("kept", "error", "fallback")]
    if other:
        out.append("kept on the reference kernel / errors / fallbacks")
        out += [f"  [{d.stage}] {d.node}: {d.action}: {d.reason}" for d in other]
    return "\n".join(out)


if __name__ == "__main__":
    main()
