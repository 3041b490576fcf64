"""The worker: one fresh process per (model, batch, config).

Why a process each: peak RSS is only meaningful per process (``ru_maxrss``), compile
caches and global flags (Inductor's ``freezing``) must not leak from one config into
the next, and the IPEX configs need another interpreter (torch 2.8). Why it stays alive
and takes commands: so the parent can interleave timing rounds across configs, and
machine drift (other jobs, thermals) hits every config alike.

Protocol (JSON lines over two pipes whose fds come in argv; stdout/stderr go to a log):

    worker -> {"event": "ready", compile_s, max_abs_err, ..., "est_ms": ...}
              or {"event": "error", "stage": ..., "error": ..., "traceback": ...}
    parent -> {"cmd": "run", "iters": N, "rewarm": K}  worker -> {"event": "times", "ms": [...]}
              (K untimed calls first: the worker was idle while the others ran, its threads
              slept and its caches went cold; every config pays that alike, untimed)
    parent -> {"cmd": "finish", "profile": K} worker -> {"event": "done", peak_rss_mb, ...}

Run as ``python -m bench.measure SPEC_JSON READ_FD WRITE_FD`` from the repository root.
Imports only torch, the stdlib and bench.{models,configs} at start-up, so it works in
the IPEX venv too.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback


class Channel:
    def __init__(self, rfd: int, wfd: int):
        self.r = os.fdopen(rfd, "r", buffering=1)
        self.w = os.fdopen(wfd, "w", buffering=1)

    def send(self, **msg):
        self.w.write(json.dumps(msg) + "\n")
        self.w.flush()

    def recv(self) -> dict:
        line = self.r.readline()
        if not line:
            raise EOFError("parent closed the pipe")
        return json.loads(line)


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _leaves(out):
    import torch
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in _leaves(o)]


def compare(out, ref) -> dict:
    """Max abs error over all float outputs, and the same relative to each output's
    scale (max |ref|); the targets speak of the relative one."""
    got, want = _leaves(out), _leaves(ref)
    if len(got) != len(want):
        raise ValueError(f"{len(got)} outputs, eager gives {len(want)}")
    abs_err, rel_err, scale = 0.0, 0.0, 0.0
    for g, w in zip(got, want):
        if tuple(g.shape) != tuple(w.shape):
            raise ValueError(f"output shape {tuple(g.shape)}, eager gives {tuple(w.shape)}")
        if not w.is_floating_point():
            continue
        e = (g.float() - w.float()).abs().max().item() if w.numel() else 0.0
        s = w.float().abs().max().item() if w.numel() else 0.0
        abs_err, scale = max(abs_err, e), max(scale, s)
        rel_err = max(rel_err, e / s if s > 0 else e)
    return {"max_abs_err": abs_err, "max_rel_err": rel_err, "out_scale": scale}


def profile(fn, inputs, iters: int, top: int = 12) -> list:
    """Top ops by self CPU time over ``iters`` calls (torch.profiler), per call."""
    import torch
    from torch.profiler import ProfilerActivity
    with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            fn(*inputs)
    rows = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in rows) or 1.0
    rows.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1000 / iters,
             "calls": e.count / iters, "pct": 100 * e.self_cpu_time_total / total}
            for e in rows[:top]]


def fusepass_report(model, inputs) -> dict:
    import fusepass
    rep = fusepass.explain(model, *inputs)
    declined: dict = {}
    for d in rep.declined:
        key = f"{d.rule}: {d.reason}"
        declined[key] = declined.get(key, 0) + 1
    return {"counts": rep.counts, "kernels": rep.kernels, "fell_back": rep.fell_back,
            "declined": declined,
            "problems": [f"[{d.stage}] {d.node}: {d.reason}" for d in rep.decisions
                         if d.action in ("error", "fallback")]}


def _prewarm(config, tiny, seed) -> float:
    """Compile and run the tiny net with this config; return its first-call time (the
    process's one-time torch.compile set-up: imports, Dynamo/backend initialisation).
    Dynamo's counters and compile-time metrics are cleared after it so that the model's
    info (graphs, breaks, backend_s) is the model's alone. A different graph, so no
    compile cache can serve the model from it."""
    import torch
    model, inputs = tiny.build(seed).eval(), tiny.inputs(1, seed)
    t0 = time.perf_counter()
    fn, _ = config.make(model, inputs)
    fn(*inputs)
    init_s = time.perf_counter() - t0
    try:
        from torch._dynamo import utils
        utils.counters.clear()
        getattr(utils, "compilation_time_metrics", {}).clear()
    except Exception:
        pass
    return init_s


def main(argv) -> int:
    spec = json.loads(argv[0])
    ch = Channel(int(argv[1]), int(argv[2]))
    stage = "import"
    try:
        import torch
        torch.set_num_threads(spec["threads"])
        from bench.configs import CONFIGS
        from bench.models import MODELS, check_output

        stage = "build"
        mspec, config = MODELS[spec["model"]], CONFIGS[spec["config"]]
        t0 = time.perf_counter()
        model = mspec.build(spec["seed"], spec["attn"])
        inputs = mspec.inputs(spec["batch"], spec["seed"])
        build_s = time.perf_counter() - t0
        with torch.no_grad():
            stage = "eager reference"
            ref = model(*inputs)
            out_std = check_output(ref, "eager output")
            gflop = None
            if spec["config"] == "eager":  # the model's arithmetic, once per (model, batch)
                stage = "flop count"
                try:
                    from bench.ceiling import model_gflop
                    gflop = model_gflop(model, inputs)
                except Exception as e:  # the timing stands without it
                    print(f"flop count failed: {type(e).__name__}: {e}", file=sys.stderr)
            init_s = None
            if spec.get("prewarm") and spec["model"] != "tiny":
                stage = "prewarm"
                init_s = _prewarm(config, MODELS["tiny"], spec["seed"])
            stage = "compile"
            rss_before = _rss_mb()
            t0 = time.perf_counter()
            # for the tests: BENCH_INJECT_FAULT="<config>:raise,<config>:exit"
            faults = dict(f.split(":", 1) for f in os.environ.get("BENCH_INJECT_FAULT", "").split(",")
                          if ":" in f)
            if faults.get(spec["config"]) == "exit":
                os._exit(3)
            if faults.get(spec["config"]) == "raise":
                raise RuntimeError("fault injected by BENCH_INJECT_FAULT")
            fn, info = config.make(model, inputs)
            out = fn(*inputs)
            compile_s = time.perf_counter() - t0
            info = dict(info() if callable(info) else info)
            stage = "compare"
            err = compare(out, ref)
            del out
            stage = "warm-up"
            times = []
            t_end = time.perf_counter() + spec["warmup_s"]
            while len(times) < spec["warmup"] or (time.perf_counter() < t_end and len(times) < 50):
                t0 = time.perf_counter()
                fn(*inputs)
                times.append(time.perf_counter() - t0)
        tail = sorted(times[len(times) // 2:])
        ch.send(event="ready", build_s=build_s, compile_s=compile_s, init_s=init_s, out_std=out_std,
                gflop=gflop,
                rss_before_compile_mb=rss_before, info=info, torch=torch.__version__,
                warmup_iters=len(times), est_ms=1000 * tail[len(tail) // 2], **err)

        stage = "timing"
        while True:
            cmd = ch.recv()
            if cmd["cmd"] == "run":
                ms = []
                with torch.no_grad():
                    for _ in range(cmd.get("rewarm", 0)):  # untimed: wake threads, warm caches
                        fn(*inputs)
                    for _ in range(cmd["iters"]):
                        t0 = time.perf_counter()
                        fn(*inputs)
                        ms.append(1000 * (time.perf_counter() - t0))
                ch.send(event="times", ms=ms)
            elif cmd["cmd"] == "finish":
                done = {"peak_rss_mb": _peak_rss_mb(), "rss_mb": _rss_mb()}
                if cmd.get("profile"):
                    stage = "profile"
                    with torch.no_grad():
                        done["profile"] = profile(fn, inputs, cmd["profile"])
                if spec["config"] in ("fusepass", "fusepass_int8", "fusepass_int8_dynamic"):
                    stage = "fusepass.explain"
                    try:  # int8: the converted graph the config compiled
                        done["fusepass"] = fusepass_report(
                            getattr(fn, "bench_source_model", model), inputs)
                    except Exception as e:  # the timing stands; say why the report is missing
                        done["fusepass"] = {"error": f"{type(e).__name__}: {e}"}
                ch.send(event="done", **done)
                return 0
            else:
                raise ValueError(f"unknown command {cmd!r}")
    except EOFError:
        return 1
    except BaseException as e:  # report, never hang the parent
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        try:
            ch.send(event="error", stage=stage, error=f"{type(e).__name__}: {e}"[:2000],
                    traceback=tb[-4000:])
        except Exception:
            pass
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
