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

The whole net (``--whole``): ``torch.fx.experimental.optimization.optimize_for_inference``
(stock torch's blocked path for a model: conv+BN fused, MKLDNN tensors between the convs,
dense at the edges) against ``torch.compile(backend="fusepass")`` on ResNet-50, one
process, interleaved rounds, with the primitives the blocked graph runs per call.

    python -m bench.blocked_kernels --out bench-results/blocked-kernels
    python -m bench.blocked_kernels --whole --threads 1
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


def whole_net(rounds, batch):
    """Lines: numerics, the blocked graph's primitives per call, wall and CPU medians."""
    import copy

    import torch.fx.experimental.optimization as fx_opt

    from bench.models import MODELS
    spec = MODELS["resnet50"]
    model, (x,) = spec.build(0, "sdpa").eval(), spec.inputs(batch, 0)
    lines = []
    with torch.no_grad():
        ref = model(x)
        blocked = fx_opt.optimize_for_inference(copy.deepcopy(model))
        fused = torch.compile(model, backend="fusepass")
        fns = {"fusepass": lambda: fused(x), "blocked (optimize_for_inference)": lambda: blocked(x)}
        for k, fn in fns.items():
            for _ in range(3):
                y = fn()
            lines.append(f"{k}: max abs error / max |eager| = "
                         f"{float((y - ref).abs().max() / ref.abs().max()):.1e}")
        counts = {}
        for ln in onednn_verbose(fns["blocked (optimize_for_inference)"], 1):
            f = ln.split(",")
            if len(f) > 10 and f[2] == "primitive" and f[3] == "exec":
                src = re.search(r"(?:src|data):f32:\w*:blocked:(\w+)", f[8])
                key = f"{f[5]} {f[6]} ({src.group(1) if src else '?'})"
                counts[key] = counts.get(key, 0) + 1
        lines.append("blocked graph, primitives per call: " + ", ".join(
            f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])))
        res = {k: ([], []) for k in fns}
        for r in range(rounds):
            for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                ws, cs = [], []
                for _ in range(4):
                    t0, c0 = time.perf_counter(), time.process_time()
                    fns[k]()
                    ws.append(time.perf_counter() - t0)
                    cs.append(time.process_time() - c0)
                res[k][0].append(statistics.median(ws) * 1e3)
                res[k][1].append(statistics.median(cs) * 1e3)
    for k, (w, c) in res.items():
        lines.append(f"{k}: wall {statistics.median(w):.1f} ms (rounds {min(w):.1f}-{max(w):.1f}), "
                     f"process CPU {statistics.median(c):.1f} ms")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.blocked_kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-results/blocked-kernels")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=0.25)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--whole", action="store_true", help="ResNet-50 whole net instead of shapes")
    p.add_argument("--only", default="", help="comma-separated substrings of shape names")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from bench.int8_kernels import cpu_flags
    cpu, flags = cpu_flags()
    if a.whole:
        lines = [f"ResNet-50 bs {a.batch}; CPU: {cpu}; flags: {' '.join(flags)}; torch "
                 f"{torch.__version__}; {a.threads} threads; {a.rounds} interleaved rounds"]
        lines += whole_net(a.rounds, a.batch)
        print("\n".join(lines))
        return
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
