"""Ablation: what NHWC layout propagation and weight prepacking each buy on ResNet-50.

    python -m bench.layout_ablation [--batch 1 8] [--rounds 15] [--res 224]

Configs: fusepass (everything), fusepass without ``propagate_layout``, without
``prepack_weights``, without both, and eager. Same model (``bench.zoo.build``:
re-initialized, calibrated), same contiguous NCHW input, 2 threads. Rounds are
interleaved — each round times every config once, in a rotated order — so drift in
machine load hits all configs alike; we report the median and IQR over rounds. Note the
coupling: convs outside NHWC regions keep dense weights (a packed weight makes oneDNN
return channels-last), so without layout propagation only the Linear is prepacked.
Writes ``bench/results/layout_ablation.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import fusepass
from bench import zoo as models

CONFIGS = {  # name -> fusepass disable list (None: eager)
    "fusepass": [],
    "no propagate_layout": ["propagate_layout"],
    "no prepack_weights": ["prepack_weights"],
    "neither": ["propagate_layout", "prepack_weights"],
    "eager": None,
}
OUT = Path(__file__).resolve().parent / "results"


def build(model, x, disable):
    if disable is None:
        return model, {}
    t0 = time.perf_counter()
    with torch.no_grad():
        opt = fusepass.optimize(torch.fx.symbolic_trace(model), [x], disable=disable)
    rep = opt.fusepass_report
    info = {
        "compile_s": round(time.perf_counter() - t0, 2),
        "conversions": sum(1 for n in opt.graph.nodes if n.op == "call_function"
                           and n.target is torch.ops.aten.clone.default and "memory_format" in n.kwargs),
        "packed_weights": sum(1 for _, b in opt.named_buffers() if b.is_mkldnn),
        "packed_bytes": sum(torch.ops.mkldnn._nbytes(b) for _, b in opt.named_buffers() if b.is_mkldnn),
        "regions": [f"{d.action}: {d.reason}" for d in rep.where(stage="propagate_layout")],
        "errors": [f"{d.stage}: {d.reason}" for d in rep.decisions if d.action == "error"],
    }
    return opt, info


def measure(fns, x, rounds, min_s):
    """{name: [ms per call, one sample per round]}; each sample averages calls over >= min_s."""
    samples = {k: [] for k in fns}
    names = list(fns)
    with torch.no_grad():
        for f in fns.values():  # warm-up
            for _ in range(2):
                f(x)
        for r in range(rounds):
            for k in names[r % len(names):] + names[:r % len(names)]:
                n, t0 = 0, time.perf_counter()
                while True:
                    fns[k](x)
                    n += 1
                    dt = time.perf_counter() - t0
                    if dt >= min_s:
                        break
                samples[k].append(1000 * dt / n)
    return samples


def summarize(ms):
    q = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
    return {"median_ms": round(statistics.median(ms), 3), "iqr_ms": round(q[2] - q[0], 3),
            "samples_ms": [round(m, 3) for m in ms]}


def markdown(data) -> str:
    m = data["meta"]
    lines = [f"# Layout / prepack ablation — ResNet-50, {m['res']}x{m['res']}, "
             f"{m['threads']} threads, torch {m['torch']}, {m['rounds']} interleaved rounds", "",
             f"Load average (1/5/15 min) before {m['loadavg_before_after'][0]}, after "
             f"{m['loadavg_before_after'][1]}: the machine is shared, so compare configs within "
             "a batch size (they saw the same load), not across runs.", "",
             "| batch | config | median ms | IQR ms | min ms | vs eager | vs fusepass | "
             "conversions | packed weights (MB) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        packed = "-" if "packed_bytes" not in r else (
            f"{r['packed_weights']} ({r['packed_bytes'] / 1e6:.1f})")
        lines.append(f"| {r['batch']} | {r['config']} | {r['median_ms']:.1f} | {r['iqr_ms']:.1f} | "
                     f"{min(r['samples_ms']):.1f} | "
                     f"{r['speedup_vs_eager']:.2f}x | {r['vs_fusepass']:.2f}x | "
                     f"{r.get('conversions', '-')} | {packed} |")
    lines += ["", "`vs` columns compare medians; `vs fusepass` > 1 means slower than full "
              "fusepass. `min` is the least-disturbed sample (useful on a loaded machine). Regions:"]
    for r in data["results"]:
        for reg in r.get("regions", []):
            lines.append(f"- bs {r['batch']}, {r['config']}: {reg}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--min-s", type=float, default=0.3, help="time per sample (>= 1 call)")
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--render", type=Path, help="re-render the markdown of an earlier JSON")
    args = p.parse_args(argv)
    if args.render:
        print(markdown(json.loads(args.render.read_text())))
        return
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    model = models.build("resnet50")
    results = []
    for bs in args.batch:
        x = models.example_input("resnet50", bs, args.res)
        fns, infos = {}, {}
        with torch.no_grad():
            want = model(x)
        for name, disable in CONFIGS.items():
            fns[name], infos[name] = build(model, x, disable)
            with torch.no_grad():
                err = (fns[name](x) - want).abs().max().item() / want.abs().max().item()
            infos[name]["max_rel_err"] = err
            assert err < 1e-3, f"{name} at batch {bs} differs from eager by {err:.2e}"
            print(f"bs {bs}: built {name} {infos[name].get('compile_s', '')}", flush=True)
        samples = measure(fns, x, args.rounds, args.min_s)
        for name in CONFIGS:
            results.append({"batch": bs, "config": name, **summarize(samples[name]), **infos[name]})
        eager = next(r for r in results if r["batch"] == bs and r["config"] == "eager")["median_ms"]
        full = next(r for r in results if r["batch"] == bs and r["config"] == "fusepass")["median_ms"]
        for r in results:
            if r["batch"] == bs:
                r["speedup_vs_eager"] = eager / r["median_ms"]
                r["vs_fusepass"] = r["median_ms"] / full
    data = {"meta": {"model": "resnet50", "res": args.res, "threads": args.threads,
                     "rounds": args.rounds, "min_s": args.min_s, "torch": torch.__version__,
                     "cpu": platform.processor() or platform.machine(),
                     "when": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "loadavg_before_after": [load_before, os.getloadavg()]},
            "results": results}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "layout_ablation.json").write_text(json.dumps(data, indent=1))
    md = markdown(data)
    (OUT / "layout_ablation.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
