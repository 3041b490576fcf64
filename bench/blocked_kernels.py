"""oneDNN's blocked-layout (nChw8c) fp32 convs against the channels-last ones fusepass runs.

Why: DESIGN.md runs conv regions "channels-last (or oneDNN's blocked layouts, where they
pay)", and issue 16 suspected that OpenVINO/ORT win on AVX2 with nChw8c kernels. Stock
torch 2.13 reaches the blocked kernels only through MKLDNN opaque tensors
(``Tensor.to_mkldnn()`` + ``torch.mkldnn_convolution``, what ``torch.utils.mkldnn``
modules run): oneDNN then picks its ``jit:avx2`` direct conv on ``aBcd8b`` (nChw8c), no
post-ops. fusepass runs ``mkldnn._convolution_pointwise`` on channels-last input with a
prepacked weight: ``brg_conv_fwd:avx2`` / ``brgconv_1x1:avx2`` on ``acdb`` with the ReLU
fused. This times both per ResNet-50 conv shape, in one process, interleaved rounds:

* ``cl``: the fusepass kernel (conv + fused relu), wall ms per call;
* ``blocked``: ``mkldnn_convolution`` on a blocked input (made by a blocked conv, so no
  input reorder), then ``torch.relu`` on the blocked result (no fused post-op exists on
  this path), wall ms per call; ``torch._C._nn.mkldnn_reorder_conv2d_weight`` packs the
  weight for the channels-last kernel's format (``Acdb32a``), which the blocked primitive
  reorders again every call (``ABcd8b8a``) — its cost is in the wall time;
* ``*_prim``: the conv primitive's own execution time from ``ONEDNN_VERBOSE`` (median),
  the kernel without the per-call weight reorder, the relu or the op's overhead.

    python -m bench.blocked_kernels --out bench-results/blocked-kernels
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time

import torch

from bench.fp32_layers import onednn_verbose

# ResNet-50's conv shapes (bench.zoo: stride on the 3x3): (k, stride, cin, cout, H_in), count
SHAPES = [((7, 2, 3, 64, 224), 1), ((1, 1, 64, 64, 56), 1), ((3, 1, 64, 64, 56), 3),
          ((1, 1, 64, 256, 56), 4), ((1, 1, 256, 64, 56), 2), ((1, 1, 256, 128, 56), 1),
          ((3, 2, 128, 128, 56), 1), ((1, 2, 256, 512, 56), 1), ((1, 1, 128, 512, 28), 4),
          ((1, 1, 512, 128, 28), 3), ((3, 1, 128, 128, 28), 3), ((1, 1, 512, 256, 28), 1),
          ((3, 2, 256, 256, 28), 1), ((1, 2, 512, 1024, 28), 1), ((1, 1, 256, 1024, 14), 6),
          ((1, 1, 1024, 256, 14), 5), ((3, 1, 256, 256, 14), 5), ((1, 1, 1024, 512, 14), 1),
          ((3, 2, 512, 512, 14), 1), ((1, 2, 1024, 2048, 14), 1), ((1, 1, 512, 2048, 7), 3),
          ((1, 1, 2048, 512, 7), 2), ((3, 1, 512, 512, 7), 2)]


def name(k, s, cin, cout, h):
    return f"{k}x{k}/{s} {cin}->{cout} @{h}"


def kernels(k, s, cin, cout, h, batch):
    g = torch.Generator().manual_seed(0)
    pad, st, dl = [k // 2] * 2, [s] * 2, [1, 1]
    x = torch.randn(batch, cin, h, h, generator=g)
    w = torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cin * k * k)) ** 0.5
    b = torch.randn(cout, generator=g) * 0.1
    xc = x.contiguous(memory_format=torch.channels_last)
    pw = torch.ops.mkldnn._reorder_convolution_weight(w, pad, st, dl, 1, list(x.shape))
    cl = lambda: torch.ops.mkldnn._convolution_pointwise(xc, pw, b, pad, st, dl, 1, "relu", [], None)  # noqa: E731
    # a blocked input: the output of a blocked 1x1 conv (identity weight) on the plain one
    eye = torch.eye(cin).reshape(cin, cin, 1, 1).to_mkldnn()
    xb = torch.mkldnn_convolution(x.to_mkldnn(), eye, None, [0, 0], [1, 1], [1, 1], 1)
    wb = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), pad, st, dl, 1, list(x.shape))
    blocked = lambda: torch.relu(torch.mkldnn_convolution(xb, wb, b, pad, st, dl, 1))  # noqa: E731
    ref = torch.relu(torch.nn.functional.conv2d(x, w, b, s, k // 2))
    for fn in (cl, blocked):
        y = fn()
        y = y.to_dense() if y.is_mkldnn else y
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    return {"cl": cl, "blocked": blocked}


def _wall(fn, seconds):
    """Median ms per call: wall, and the process's CPU time (``time.process_time``: with
    one thread, the kernel's time without the preemption a shared machine adds)."""
    ts, cs, end = [], [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(ts) < 5:
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        ts.append(time.perf_counter() - t0)
        cs.append(time.process_time() - c0)
    return statistics.median(ts) * 1e3, statistics.median(cs) * 1e3


def _prim(fn, calls):
    """{impl (src format): median ms} of the convolution primitives ``calls`` runs execute."""
    times = {}
    for ln in onednn_verbose(fn, calls):
        f = ln.strip().split(",")
        if len(f) > 10 and f[2] == "primitive" and f[3] == "exec" and f[5] == "convolution":
            src = re.search(r"src:f32:\w*:blocked:(\w+)", f[8])
            times.setdefault(f"{f[6]} ({src.group(1) if src else '?'})", []).append(float(f[-1]))
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.blocked_kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-results/blocked-kernels")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=0.25)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", default="", help="comma-separated substrings of shape names")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from bench.int8_kernels import cpu_flags
    cpu, flags = cpu_flags()
    rows = []
    for shape, count in SHAPES:
        if a.only and not any(o in name(*shape) for o in a.only.split(",")):
            continue
        fns = kernels(*shape, a.batch)
        for fn in fns.values():
            fn(), fn()
        wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
        for r in range(a.rounds):  # interleaved, order rotated per round
            order = list(fns) if r % 2 == 0 else list(fns)[::-1]
            for k in order:
                w, c = _wall(fns[k], a.seconds)
                wall[k].append(w)
                cpu[k].append(c)
        prim = {k: _prim(fn, 20) for k, fn in fns.items()}
        row = {"shape": name(*shape), "count": count,
               **{k: statistics.median(v) for k, v in wall.items()},
               **{f"{k}_cpu": statistics.median(v) for k, v in cpu.items()},
               **{f"{k}_prim": prim[k] for k in fns}}
        rows.append(row)
        print(row, flush=True)
    tot = {k: sum(r[k] * r["count"] for r in rows) for k in ("cl", "blocked", "cl_cpu", "blocked_cpu")}
    ptot = {k: sum(sum(r[f"{k}_prim"].values()) * r["count"] for r in rows) for k in ("cl", "blocked")}
    lines = [f"bs {a.batch}; CPU: {cpu}; flags: {' '.join(flags)}; torch {torch.__version__}; "
             f"{a.threads} threads; {a.rounds} interleaved rounds of {a.seconds} s", "",
             "| shape | n | cl ms (impl) | blocked ms (impl) | blocked/cl wall | cl cpu ms | blocked cpu ms | "
             "blocked/cl cpu | prim cl | prim blocked | prim ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        pc, pb = sum(r["cl_prim"].values()), sum(r["blocked_prim"].values())
        lines.append(f"| {r['shape']} | {r['count']} | {r['cl']:.3f} ({', '.join(r['cl_prim'])}) | "
                     f"{r['blocked']:.3f} ({', '.join(r['blocked_prim'])}) | {r['blocked'] / r['cl']:.2f} | "
                     f"{r['cl_cpu']:.3f} | {r['blocked_cpu']:.3f} | {r['blocked_cpu'] / r['cl_cpu']:.2f} | "
                     f"{pc:.3f} | {pb:.3f} | {pb / pc:.2f} |")
    lines.append(f"| ResNet-50 convs (x count) | {sum(r['count'] for r in rows)} | {tot['cl']:.1f} | {tot['blocked']:.1f} | "
                 f"{tot['blocked'] / tot['cl']:.2f} | {tot['cl_cpu']:.1f} | {tot['blocked_cpu']:.1f} | "
                 f"{tot['blocked_cpu'] / tot['cl_cpu']:.2f} | {ptot['cl']:.1f} | {ptot['blocked']:.1f} | "
                 f"{ptot['blocked'] / ptot['cl']:.2f} |")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"results-t{a.threads}.json"), "w") as f:
        json.dump({"cpu": cpu, "flags": flags, "threads": a.threads, "rows": rows}, f, indent=1)
    with open(os.path.join(a.out, f"results-t{a.threads}.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
