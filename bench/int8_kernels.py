"""What oneDNN's int8 conv kernel gains over its fp32 one on this CPU, per layer shape.

Why: fusepass's int8 ResNet-50 is kernel-bound (the qconv kernels are ~95 % of its time),
so the int8/fp32 ratio of the kernels themselves bounds what any int8 graph rewrite can
reach here. Times ResNet-50's conv shapes at batch 1 (and 8), both kernels with packed
weights and channels-last activations, interleaved, median of many calls; writes JSON and
a markdown table.

    python -m bench.int8_kernels --out bench-results/int8-kernels
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

# (name, cin, cout, k, stride, spatial): ResNet-50 bottleneck convs at each stage
SHAPES = [("stem 7x7/2", 3, 64, 7, 2, 224), ("l1 1x1 256->64", 256, 64, 1, 1, 56),
          ("l1 3x3 64", 64, 64, 3, 1, 56), ("l2 3x3 128", 128, 128, 3, 1, 28),
          ("l3 3x3 256", 256, 256, 3, 1, 14), ("l3 1x1 256->1024", 256, 1024, 1, 1, 14),
          ("l4 3x3 512", 512, 512, 3, 1, 7)]


def _time(fn, seconds):
    for _ in range(3):
        fn()
    ts, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(ts) < 10:
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def kernels(cin, cout, k, stride, hw, batch):
    import torch.ao.quantization.fx._decomposed  # noqa: F401
    qd = torch.ops.quantized_decomposed
    pad, g = k // 2, torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, hw, hw, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, k, k, generator=g) * 0.05
    b = torch.randn(cout, generator=g)
    st, pd, dl = [stride] * 2, [pad] * 2, [1, 1]
    pw = torch.ops.mkldnn._reorder_convolution_weight(w, pd, st, dl, 1, list(x.shape))
    fp32 = lambda: torch.ops.mkldnn._convolution_pointwise(x, pw, b, pd, st, dl, 1, "relu", [], None)  # noqa: E731
    xs, ws = 0.03, (w.abs().amax((1, 2, 3)) / 127)
    wz = torch.zeros(cout, dtype=torch.int64)
    qx = qd.quantize_per_tensor(x, xs, 64, 0, 127, torch.uint8).contiguous(memory_format=torch.channels_last)
    qw = qd.quantize_per_channel(w, ws, wz, 0, -128, 127, torch.int8)
    qpw = torch.ops.onednn.qconv_prepack(qw, ws, xs, 64, st, pd, dl, 1, list(x.shape))
    int8 = lambda: torch.ops.onednn.qconv_pointwise(  # noqa: E731
        qx, xs, 64, qpw, ws, wz, b, st, pd, dl, 1, 0.05, 0, torch.uint8, "relu", [], "")
    return fp32, int8


def cpu_flags():
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                  if ln.startswith("model name")), "?")
    keep = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16"]
    return model, [f for f in keep if f in flags]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench-results/int8-kernels")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 2))
    model, flags = cpu_flags()
    rows = []
    for batch in [int(b) for b in a.batch.split(",")]:
        for name, cin, cout, k, s, hw in SHAPES:
            fp32, int8 = kernels(cin, cout, k, s, hw, batch)
            f, q = [], []
            for _ in range(a.rounds):  # interleaved
                f.append(_time(fp32, a.seconds))
                q.append(_time(int8, a.seconds))
            rows.append({"shape": name, "batch": batch, "fp32_ms": statistics.median(f),
                         "int8_ms": statistics.median(q)})
            rows[-1]["speedup"] = rows[-1]["fp32_ms"] / rows[-1]["int8_ms"]
            print(f"bs{batch} {name}: fp32 {rows[-1]['fp32_ms']:.3f} ms, int8 "
                  f"{rows[-1]['int8_ms']:.3f} ms, {rows[-1]['speedup']:.2f}x", flush=True)
    os.makedirs(a.out, exist_ok=True)
    meta = {"cpu": model, "flags": flags, "torch": torch.__version__, "threads": torch.get_num_threads()}
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
    lines = [f"CPU: {model}; flags: {' '.join(flags) or '-'}; torch {torch.__version__}; "
             f"{torch.get_num_threads()} threads", "",
             "| batch | conv | fp32 ms | int8 ms | int8 speedup |", "|---:|---|---:|---:|---:|"]
    lines += [f"| {r['batch']} | {r['shape']} | {r['fp32_ms']:.3f} | {r['int8_ms']:.3f} | "
              f"{r['speedup']:.2f}× |" for r in rows]
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
