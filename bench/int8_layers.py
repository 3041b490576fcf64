"""Where the time of an int8 model goes, op by op: fusepass against OpenVINO+NNCF.

Why: issue 15 wants fusepass-int8 within 0.9x of OpenVINO-int8, and the bench shows
where it stands but not why. This profiles one model in two processes (one config per
process, as everywhere in bench/): fusepass's int8 graph under ``torch.profiler``
(self CPU time per op, kernels named as oneDNN's ``onednn::qconv_pointwise`` ...), and
OpenVINO's NNCF-quantized model with ``PERF_COUNT`` (real time per node, grouped by node
type and the implementation the CPU plugin chose, e.g. ``brgconv_avx2_1x1_I8``). Both
quantize the same way as the bench's int8 rows (``bench/configs.py``). Writes JSON and a
markdown table per side.

    python -m bench.int8_layers --model resnet50 --batch 1 --out bench-results/int8-layers
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time

import torch


def _calls(fn, inputs, seconds):
    ts, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(ts) < 5:
        t0 = time.perf_counter()
        fn(*inputs)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def profile_fusepass(model, inputs, calls):
    from bench.configs import make_fusepass_int8
    fn, _ = make_fusepass_int8(model, inputs)
    with torch.no_grad():
        median = _calls(fn, inputs, 3.0)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                fn(*inputs)
    rows = collections.Counter()
    counts = collections.Counter()
    for e in prof.key_averages():
        if e.key.startswith(("aten::", "onednn::", "mkldnn::", "quantized::", "quantized_decomposed::")):
            rows[e.key] += e.self_cpu_time_total / 1e3 / calls
            counts[e.key] += e.count // calls
    return median, [{"op": k, "impl": "", "ms": v, "count": counts[k]} for k, v in rows.items()]


def profile_openvino(model, inputs, calls):
    import openvino as ov

    from bench.configs import OPENVINO_CPU_CONFIG, _calibration, _numpy_inputs
    import nncf
    example = tuple(inputs) if len(inputs) > 1 else inputs[0]
    ov_model = ov.convert_model(model, example_input=example)
    calib = [_numpy_inputs(b) for b in _calibration(inputs)]
    qov = nncf.quantize(ov_model, nncf.Dataset(calib, lambda b: b if len(b) > 1 else b[0]))
    cfg = dict(OPENVINO_CPU_CONFIG, INFERENCE_NUM_THREADS=torch.get_num_threads(), PERF_COUNT="YES")
    request = ov.Core().compile_model(qov, "CPU", cfg).create_infer_request()
    feed = _numpy_inputs(inputs)
    median = _calls(lambda *_: request.infer(feed), inputs, 3.0)
    rows, counts = collections.Counter(), collections.Counter()
    for _ in range(calls):
        request.infer(feed)
        for p in request.get_profiling_info():
            if p.status.name == "EXECUTED":
                key = (p.node_type, p.exec_type)
                rows[key] += p.real_time.total_seconds() * 1e3 / calls
                counts[key] += 1
    return median, [{"op": k[0], "impl": k[1], "ms": v, "count": counts[k] // calls}
                    for k, v in rows.items()]


def worker(which, model_name, batch, calls, out):
    from bench.models import MODELS
    torch.set_num_threads(2)
    spec = MODELS[model_name]
    model, inputs = spec.build(0, "sdpa").eval(), spec.inputs(batch, 0)
    with torch.no_grad():
        median, rows = (profile_fusepass if which == "fusepass" else profile_openvino)(
            model, inputs, calls)
    rows.sort(key=lambda r: -r["ms"])
    with open(out, "w") as f:
        json.dump({"which": which, "median_ms": median, "rows": rows}, f, indent=1)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.int8_layers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--out", default="bench-results/int8-layers")
    p.add_argument("--worker", choices=("fusepass", "openvino"), help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a.worker, a.model, a.batch, a.calls, a.file)
    from bench.int8_kernels import cpu_flags
    os.makedirs(a.out, exist_ok=True)
    cpu, flags = cpu_flags()
    lines = [f"{a.model} bs {a.batch}; CPU: {cpu}; flags: {' '.join(flags) or '-'}; "
             f"torch {torch.__version__}; 2 threads; {a.calls} profiled calls", ""]
    result = {"model": a.model, "batch": a.batch, "cpu": cpu, "flags": flags, "sides": {}}
    for which in ("fusepass", "openvino"):  # one process each
        path = os.path.join(a.out, f"{which}.json")
        subprocess.run([sys.executable, "-m", "bench.int8_layers", "--worker", which,
                        "--model", a.model, "--batch", str(a.batch), "--calls", str(a.calls),
                        "--file", path], check=True)
        with open(path) as f:
            side = json.load(f)
        result["sides"][which] = side
        total = sum(r["ms"] for r in side["rows"])
        lines += [f"### {which}: median {side['median_ms']:.1f} ms per call "
                  f"(profiled ops sum to {total:.1f} ms)", "",
                  "| op | implementation | calls | ms per call | share |", "|---|---|---:|---:|---:|"]
        lines += [f"| {r['op']} | {r['impl']} | {r['count']} | {r['ms']:.2f} | "
                  f"{100 * r['ms'] / total:.0f} % |" for r in side["rows"][:12]]
        lines.append("")
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
