"""Where an fp32 conv net's time goes, layer by layer: fusepass against OpenVINO and ORT.

Why: issue 16 measured OpenVINO and ONNX Runtime ahead of fusepass on ResNet-50 fp32 on
AVX2 machines, and the bench says by how much but not where. This profiles one model in
three processes (one config per process, as everywhere in bench/; peers' threads must not
share a process with torch's):

* fusepass (``torch.compile(backend="fusepass")``, the bench's ``fusepass`` config): every
  oneDNN primitive of the profiled calls from ``ONEDNN_VERBOSE`` (``profile_exec``: the
  implementation, e.g. ``brg_conv_fwd:avx2``, its formats, problem and execution ms), and
  the rest of the call from ``torch.profiler`` (self CPU time of the ATen ops);
* OpenVINO (the ``openvino`` config) with ``PERF_COUNT``: real time per node, the node's
  type and the kernel its CPU plugin chose (``jit_avx2_1x1``, ``brgconv_avx2`` ...), conv
  shapes from the runtime model;
* ONNX Runtime (the ``onnxruntime`` config) with ``enable_profiling``: kernel time per
  node, op type (``FusedConv``, ``Conv``), shapes from the profile.

Convs are grouped by shape class (stem 7x7/2, 1x1, 1x1/2, 3x3, 3x3/2) and by exact shape
(``k s cin->cout @H``), the rest by op. Writes JSON and a markdown table.

    python -m bench.fp32_layers --model resnet50 --batch 1 --out bench-results/fp32-layers
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

SIDES = ("fusepass", "openvino", "onnxruntime")


def conv_class(k, stride, cin):
    if k == 7:
        return "stem 7x7/2"
    return f"{k}x{k}" + (f"/{stride}" if stride > 1 else "")


def conv_key(k, stride, cin, cout, h):
    return f"{k}x{k}/{stride} {cin}->{cout} @{h}"


def _median_ms(fn, inputs, seconds):
    """(median wall ms, median process CPU ms, calls). The CPU time counts every thread of
    the process: at one thread and with no spinning it is the call's own work, without the
    preemption a shared machine adds to the wall time."""
    for _ in range(3):  # compile (torch.compile's first call), first-touch of buffers
        fn(*inputs)
    ts, cs, end = [], [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(ts) < 5:
        t0, c0 = time.perf_counter(), time.process_time()
        fn(*inputs)
        ts.append(time.perf_counter() - t0)
        cs.append(time.process_time() - c0)
    return statistics.median(ts) * 1e3, statistics.median(cs) * 1e3, len(ts)


_PROBLEM = re.compile(r"mb(\d+)_ic(\d+)oc(\d+)_ih(\d+)oh(\d+)kh(\d+)sh(\d+)")


def _onednn_rows(lines, calls):
    """ONEDNN_VERBOSE exec lines -> rows (one per primitive kind/impl/shape)."""
    rows = collections.defaultdict(lambda: {"ms": 0.0, "count": 0})
    for ln in lines:
        f = ln.strip().split(",")
        if len(f) < 11 or f[2] != "primitive" or f[3] != "exec":
            continue
        kind, impl, fmts, problem, ms = f[5], f[6], f[8], f[-2], float(f[-1])
        if kind == "convolution" and (m := _PROBLEM.search(problem)):
            _, cin, cout, ih, _, kh, sh = map(int, m.groups())
            op, key = conv_class(kh, sh, cin), conv_key(kh, sh, cin, cout, ih)
        else:
            op, key = kind, problem
        src = re.search(r"src:f32:\w*:blocked:(\w+)", fmts)
        r = rows[(op, key, impl + (f" ({src.group(1)})" if src else ""))]
        r["ms"] += ms / calls
        r["count"] += 1
    return [{"op": op, "shape": key, "impl": impl, "ms": v["ms"], "count": v["count"] // calls}
            for (op, key, impl), v in rows.items()]


def onednn_verbose(fn, calls):
    """The ``ONEDNN_VERBOSE`` lines (exec, with ms) of ``calls`` runs of ``fn``: oneDNN
    prints them to fd 1 from C, so fd 1 goes to a temp file meanwhile."""
    with tempfile.TemporaryFile("w+") as log:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(log.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                for _ in range(calls):
                    fn()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        return log.readlines()


def ort_conv_key(shp, out):
    """(class, key) of an ORT Conv/FusedConv from its profiled shapes [x, w, ...], [y]. Its
    NCHWc convs (MLAS, after the NCHWc transformer) are reported by their logical NCHW
    shapes, the weight as [cout, cin/groups, kh, kw] (checked on torch.onnx exports)."""
    x, w, y = shp[0], shp[1], out[0]
    k, stride = w[-1], max(1, round(x[2] / y[2]))
    return conv_class(k, stride, x[1]), conv_key(k, stride, x[1], y[1], x[2])


def profile_fusepass(model, inputs, calls):
    from bench.configs import make_fusepass
    fn, _ = make_fusepass(model, inputs)
    median, cpu, n = _median_ms(fn, inputs, 4.0)
    rows = _onednn_rows(onednn_verbose(lambda: fn(*inputs), calls), calls)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn(*inputs)
    kernel_ops = ("mkldnn::", "onednn::")
    for e in prof.key_averages():
        if e.key.startswith("aten::") and e.self_cpu_time_total > 0:
            rows.append({"op": e.key, "shape": "", "impl": "ATen (torch.profiler self time)",
                         "ms": e.self_cpu_time_total / 1e3 / calls, "count": e.count // calls})
        elif e.key.startswith(kernel_ops):  # the ops' own time, oneDNN primitives included
            rows.append({"op": e.key, "shape": "", "impl": "op total (not summed)", "ms": 0.0,
                         "count": e.count // calls, "op_ms": e.self_cpu_time_total / 1e3 / calls})
    return median, cpu, n, rows


def profile_openvino(model, inputs, calls):
    import openvino as ov

    from bench.configs import OPENVINO_CPU_CONFIG, _numpy_inputs
    example = tuple(inputs) if len(inputs) > 1 else inputs[0]
    ov_model = ov.convert_model(model, example_input=example)
    cfg = dict(OPENVINO_CPU_CONFIG, INFERENCE_NUM_THREADS=torch.get_num_threads(), PERF_COUNT="YES")
    compiled = ov.Core().compile_model(ov_model, "CPU", cfg)
    request = compiled.create_infer_request()
    feed = _numpy_inputs(inputs)
    median, cpu, n = _median_ms(lambda *_: request.infer(feed), inputs, 4.0)
    shapes = {}  # runtime node name -> (class, key)
    for op in compiled.get_runtime_model().get_ops():
        rt = op.get_rt_info()
        layer = rt["layerType"].astype(str) if "layerType" in rt else ""
        if layer != "Convolution" or op.get_input_size() < 2:
            if layer in ("FullyConnected", "MatMul"):  # transformers: by operand shapes
                shapes[op.get_friendly_name()] = (layer, " x ".join(
                    str(list(i.get_partial_shape().to_shape())) for i in op.inputs()[:2]))
            continue
        xs = op.input(0).get_partial_shape().to_shape()
        ws = op.input(1).get_partial_shape().to_shape()
        ys = op.output(0).get_partial_shape().to_shape()
        k, stride = int(ws[-1]), max(1, round(int(xs[2]) / int(ys[2])))
        shapes[op.get_friendly_name()] = (conv_class(k, stride, int(xs[1])),
                                          conv_key(k, stride, int(xs[1]), int(ys[1]), int(xs[2])))
    rows = collections.defaultdict(lambda: {"ms": 0.0, "count": 0})
    for _ in range(calls):
        request.infer(feed)
        for p in request.get_profiling_info():
            if p.status.name != "EXECUTED":
                continue
            op, key = shapes.get(p.node_name, (p.node_type, ""))
            r = rows[(op, key, p.exec_type)]
            r["ms"] += p.real_time.total_seconds() * 1e3 / calls
            r["count"] += 1
    return median, cpu, n, [{"op": op, "shape": key, "impl": impl, "ms": v["ms"],
                        "count": v["count"] // calls} for (op, key, impl), v in rows.items()]


def profile_onnxruntime(model, inputs, calls):
    import onnxruntime as ort

    from bench.configs import _numpy_inputs
    with tempfile.TemporaryDirectory(prefix="fp32-layers-") as d:
        path = os.path.join(d, "model.onnx")
        torch.onnx.export(model, tuple(inputs), path)
        so = ort.SessionOptions()  # the bench's onnxruntime config, plus the profiler
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = torch.get_num_threads()
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        plain = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(d, "prof")
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        feed = dict(zip(names, _numpy_inputs(inputs)))
        median, cpu, n = _median_ms(lambda *_: plain.run(None, feed), inputs, 4.0)
        del plain
        for _ in range(3 + calls):
            sess.run(None, feed)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    runs = [e for e in events if e.get("name") == "model_run"]
    skip_until = runs[2]["ts"] + runs[2]["dur"] if len(runs) > 2 else 0  # the 3 warm-up runs
    rows = collections.defaultdict(lambda: {"ms": 0.0, "count": 0})
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < skip_until:
            continue
        a = e.get("args", {})
        op, key = a.get("op_name", "?"), ""
        shp = [list(s.values())[0] for s in a.get("input_type_shape", [])]
        out = [list(s.values())[0] for s in a.get("output_type_shape", [])]
        if op in ("Conv", "FusedConv") and len(shp) >= 2 and out and len(shp[0]) == 4:
            op, key = ort_conv_key(shp, out)
        elif op in ("Gemm", "MatMul", "FusedMatMul", "Attention", "MatMulNBits"):
            key = " x ".join(str(x) for x in shp[:2])
        r = rows[(op, key, a.get("op_name", "?") + " " + a.get("provider", ""))]
        r["ms"] += e["dur"] / 1e3 / calls
        r["count"] += 1
    return median, cpu, n, [{"op": op, "shape": key, "impl": impl, "ms": v["ms"],
                        "count": v["count"] // calls} for (op, key, impl), v in rows.items()]


def _busy_s():
    """CPU seconds all processes spent (user+nice+system, /proc/stat)."""
    with open("/proc/stat") as f:
        user, nice, system = map(int, f.readline().split()[1:4])
    return (user + nice + system) / os.sysconf("SC_CLK_TCK")


def _children_s():
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


PROFILERS = {"fusepass": profile_fusepass, "openvino": profile_openvino,
             "onnxruntime": profile_onnxruntime}


def worker(which, model_name, batch, calls, out, threads):
    from bench.models import MODELS
    torch.set_num_threads(threads)
    spec = MODELS[model_name]
    model, inputs = spec.build(0, "sdpa").eval(), spec.inputs(batch, 0)
    with torch.no_grad():
        median, cpu, n, rows = PROFILERS[which](model, inputs, calls)
    rows.sort(key=lambda r: -r["ms"])
    with open(out, "w") as f:
        json.dump({"which": which, "median_ms": median, "cpu_ms": cpu, "timed_calls": n, "rows": rows}, f, indent=1)


def summarize(sides):
    """markdown: per class x side, then the top rows of each side."""
    classes = ["stem 7x7/2", "1x1", "1x1/2", "3x3", "3x3/2"]
    lines = ["| side | median ms | CPU ms | " + " | ".join(classes) + " | convs | rest |",
             "|---|---:|---:|" + "---:|" * (len(classes) + 2)]
    for which, s in sides.items():
        by = collections.Counter()
        for r in s["rows"]:
            by[r["op"]] += r["ms"]
        conv = sum(by[c] for c in classes)
        rest = sum(v for k, v in by.items() if k not in classes)
        lines.append(f"| {which} | {s['median_ms']:.1f} | {s['cpu_ms']:.1f} | " + " | ".join(f"{by[c]:.1f}" for c in classes)
                     + f" | {conv:.1f} | {rest:.1f} |")
    lines.append("")
    keys = sorted({r["shape"] for s in sides.values() for r in s["rows"] if r["op"] in classes})
    lines += ["| conv shape (k/s cin->cout @H_in) | count | " + " | ".join(sides) + " |",
              "|---|---:|" + "---:|" * len(sides)]
    for k in keys:
        per = {w: sum(r["ms"] for r in s["rows"] if r["shape"] == k) for w, s in sides.items()}
        cnt = max(sum(r["count"] for r in s["rows"] if r["shape"] == k) for s in sides.values())
        lines.append(f"| {k} | {cnt} | " + " | ".join(f"{per[w]:.2f}" for w in sides) + " |")
    lines.append("")
    for which, s in sides.items():
        lines += [f"### {which}: median {s['median_ms']:.1f} ms ({s['timed_calls']} calls)", "",
                  "| op | shape | implementation | per call | ms |", "|---|---|---|---:|---:|"]
        lines += [f"| {r['op']} | {r['shape']} | {r['impl']} | {r['count']} | {r['ms']:.2f} |"
                  for r in s["rows"][:25] if r["ms"] > 0]
        lines.append("")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.fp32_layers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--out", default="bench-results/fp32-layers")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a.worker, a.model, a.batch, a.calls, a.file, a.threads)
    from bench.int8_kernels import cpu_flags
    os.makedirs(a.out, exist_ok=True)
    cpu, flags = cpu_flags()
    head = [f"{a.model} bs {a.batch}; CPU: {cpu}; flags: {' '.join(flags) or '-'}; "
            f"torch {torch.__version__}; {a.threads} threads; {a.calls} profiled calls", ""]
    sides = {}
    for which in a.sides.split(","):  # one process each
        path = os.path.join(a.out, f"{which}.json")
        busy0, mine0, t0 = _busy_s(), _children_s(), time.perf_counter()
        subprocess.run([sys.executable, "-m", "bench.fp32_layers", "--worker", which,
                        "--model", a.model, "--batch", str(a.batch), "--calls", str(a.calls),
                        "--threads", str(a.threads), "--file", path], check=True)
        others = (_busy_s() - busy0 - (_children_s() - mine0)) / (time.perf_counter() - t0)
        with open(path) as f:
            sides[which] = json.load(f)
        sides[which]["other_cores_busy"] = round(max(0.0, others), 2)
        head.append(f"{which}: other processes kept {max(0.0, others):.2f} cores busy during its worker")
    lines = head + [""] + summarize(sides)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"model": a.model, "batch": a.batch, "cpu": cpu, "flags": flags, "sides": sides}, f, indent=1)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
