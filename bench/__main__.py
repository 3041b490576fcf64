"""``python -m bench``: fusepass against eager, Inductor (with and without freezing) and
IPEX, on conv nets and transformers. See bench/README.md.

    python -m bench                                   # everything (long: ~1-2 h on 2 cores)
    python -m bench --models resnet50 --batch 1 --configs eager,fusepass,inductor_freezing
    python -m bench --smoke --out /tmp/b              # CI: tiny model, 2 iterations
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench import report
from bench.configs import CONFIGS, DEFAULT_CONFIGS, SMOKE_CONFIGS
from bench.models import ATTN_IMPLEMENTATIONS, DEFAULT_MODELS, MODELS
from bench.runner import (ROOT, Job, Runner, Settings, default_ipex_python, python_env_info,
                          settings_dict)


def _csv(choices):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {sorted(choices)}")
        return items
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=_csv(MODELS), help=f"default: {','.join(DEFAULT_MODELS)}")
    p.add_argument("--batch", type=lambda s: [int(b) for b in s.split(",")], help="default: 1,8")
    p.add_argument("--configs", type=_csv(CONFIGS), help=f"default: {','.join(DEFAULT_CONFIGS)}")
    p.add_argument("--iters", type=int, help="timed calls per config per round (default: auto, "
                                             "~--round-time seconds)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 5)")
    p.add_argument("--round-time", type=float, default=2.0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attn", choices=ATTN_IMPLEMENTATIONS, default="sdpa",
                   help="HF attn_implementation for bert_base/vit_base")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, torch.profiler over N calls per config (top ops)")
    p.add_argument("--ipex-python", help="interpreter of the IPEX env (default: $BENCH_IPEX_PYTHON, "
                                         "this one if it imports IPEX, else .venv-ipex/bin/python); "
                                         "'none' disables the IPEX configs")
    p.add_argument("--warm-cache", action="store_true",
                   help="share Inductor's cache between workers (compile times become warm)")
    p.add_argument("--max-background", type=float, default=0.5, metavar="CORES",
                   help="the machine is shared: a timed run during which other processes used "
                        "more than this many cores is redone (--retries), then kept and flagged")
    p.add_argument("--quiet-timeout", type=float, default=60.0, metavar="S",
                   help="before each compile and each round, wait up to S seconds for the "
                        "machine to be quiet (0: never wait)")
    p.add_argument("--quiet-budget", type=float, default=60.0, metavar="MIN",
                   help="total minutes of such waiting per run")
    p.add_argument("--retries", type=int, default=2)
    p.add_argument("--omp-wait-policy", choices=["active", "passive"],
                   help="set OMP_WAIT_POLICY in the workers (default: leave it unset)")
    p.add_argument("--malloc-retain", action="store_true",
                   help="GLIBC_TUNABLES in every worker: large blocks from the heap, freed memory "
                        "kept (no per-call page faults for fresh activations; same for all configs)")
    p.add_argument("--cold-compile", action="store_true",
                   help="no tiny-net compile before the model: compile_s then includes the "
                        "process's one-time torch.compile set-up (init_s stays empty)")
    p.add_argument("--min-free-gb", type=float, default=6.0)
    p.add_argument("--compile-timeout", type=float, default=1800.0)
    p.add_argument("--smoke", action="store_true",
                   help="CI smoke run: tiny model, batch 1, 2 iterations, 1 round")
    p.add_argument("--out", type=Path, help="results folder (default bench/results/<timestamp>)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


ISA_FLAGS = {"sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx_vnni_int8", "avx_ne_convert"}


def machine_info() -> dict:
    cpu, flags, fam = platform.processor(), None, {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, val = line.partition(":")
            key = key.strip()
            if key == "model name" and cpu == platform.processor():
                cpu = val.strip()
            elif key in ("cpu family", "model") and key not in fam:
                fam[key] = val.strip()
            elif key == "flags" and flags is None:
                flags = set(val.split())
            if key == "" and flags is not None:  # end of the first processor's block
                break
    except OSError:
        pass
    try:
        import psutil
        mem = psutil.virtual_memory().total / 2**30
    except ImportError:
        mem = None
    # the ISA flags the kernels choose by (oneDNN, OpenVINO and ORT each dispatch on them):
    # the same model name has come with and without AVX-512 on the shared machines
    isa = sorted(f for f in (flags or ()) if f in ISA_FLAGS or f.startswith(("avx512", "amx")))
    return {"cpu": cpu, "cpu_family_model": f"{fam.get('cpu family', '?')}/{fam.get('model', '?')}",
            "isa_flags": isa, "cores": os.cpu_count(), "mem_gb": mem, "host": platform.node(),
            "python": platform.python_version(), "loadavg_start": _loadavg()}


def measure_peak(threads: int) -> dict:
    """bench.ceiling's peak GFLOP/s, measured in a child process with the workers'
    thread count; an error is recorded, never fatal."""
    try:
        out = subprocess.run([sys.executable, "-m", "bench.ceiling", str(threads)], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            return {"error": f"exit code {out.returncode}: {out.stderr.strip()[-500:]}"}
        return json.loads(out.stdout.strip().splitlines()[-1])
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def _version(mod):
    try:
        return importlib.metadata.version(mod)
    except importlib.metadata.PackageNotFoundError:
        return None


class _NoBar:
    def __init__(self, *a, **k): pass
    def update(self, n=1): pass
    def set_description(self, *a, **k): pass
    def set_postfix_str(self, *a, **k): pass
    def close(self): pass


def main(argv=None) -> int:
    args = parse_args(argv)
    models = args.models or (["tiny"] if args.smoke else DEFAULT_MODELS)
    batches = args.batch or ([1] if args.smoke else [1, 8])
    configs = args.configs or (SMOKE_CONFIGS if args.smoke else DEFAULT_CONFIGS)
    s = Settings(threads=args.threads,
                 rounds=args.rounds or (1 if args.smoke else 5),
                 iters=args.iters or (2 if args.smoke else None),
                 round_time=args.round_time, warmup=1 if args.smoke else args.warmup,
                 warmup_s=0.0 if args.smoke else 3.0, compile_timeout=args.compile_timeout,
                 profile=args.profile, attn=args.attn, min_free_gb=args.min_free_gb,
                 fresh_cache=not args.warm_cache, max_background=args.max_background,
                 quiet_timeout=0.0 if args.smoke else args.quiet_timeout,
                 quiet_budget=60.0 * args.quiet_budget,
                 retries=0 if args.smoke else args.retries,
                 omp_wait_policy=args.omp_wait_policy, prewarm=not args.cold_compile,
                 malloc_retain=args.malloc_retain)
    out = args.out or ROOT / "bench" / "results" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)

    envs = {"main": {"python": sys.executable, "torch": _version("torch"),
                     "transformers": _version("transformers"),
                     **{m: _version(m) for m in ("openvino", "onnxruntime", "onnx", "onnxscript")}}}
    ipex_python = None if (args.ipex_python or "").lower() == "none" else (
        args.ipex_python or default_ipex_python())
    ipex_why = "no IPEX environment (pass --ipex-python or set BENCH_IPEX_PYTHON)"
    if ipex_python and any(CONFIGS[c].env == "ipex" for c in configs):
        info = python_env_info(ipex_python)
        if info.get("intel_extension_for_pytorch"):
            envs["ipex"] = {"python": ipex_python, **info}
        else:
            ipex_why = ("IPEX does not import in " + ipex_python + ": "
                        + str(info.get("intel_extension_for_pytorch_error") or info.get("error")))
    s.ipex_python = envs.get("ipex", {}).get("python")

    jobs, results = [], []
    for model in models:
        for bs in batches:
            for c in configs:
                cfg, spec = CONFIGS[c], MODELS[model]
                row = {"model": model, "batch": bs, "config": c, "kind": spec.kind, "env": cfg.env}
                why = cfg.applies(spec) or (ipex_why if cfg.env not in envs else None)
                if why:
                    row.update(status="skipped", reason=why)
                    results.append(row)
                    continue
                job = Job(model, bs, c, envs[cfg.env]["python"], result=row)
                jobs.append(job)
                results.append(row)
    machine = machine_info()
    if not args.smoke:  # the measured fp32 peak, in a process of its own (bench/ceiling.py)
        machine["peak"] = measure_peak(s.threads)
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:] if argv is None else argv,
            "machine": machine, "envs": envs, "settings": settings_dict(s),
            "models": {m: MODELS[m].description for m in models},
            "configs": {c: CONFIGS[c].description for c in configs}}
    data = {"meta": meta, "results": results}

    bar_cls = _NoBar
    if not args.no_progress:
        try:
            from tqdm import tqdm as bar_cls
        except ImportError:
            pass
    tty = sys.stderr.isatty()  # in a log file, a line per minute is plenty
    bar = bar_cls(total=len(jobs) * (2 + s.rounds), unit="step", dynamic_ncols=True,
                  mininterval=0.5 if tty else 60, maxinterval=10 if tty else 600)
    log = getattr(bar_cls, "write", print) if bar_cls is not _NoBar else print
    log(f"bench: {len(jobs)} runs ({len(results) - len(jobs)} skipped) -> {out}")
    for r in results:
        if r.get("status") == "skipped":
            log(f"  skip {r['model']} bs{r['batch']} {r['config']}: {r['reason']}")

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    runner = Runner(s, out, bar, lambda m: log(m))
    try:
        for model in models:
            for bs in batches:
                group = [j for j in jobs if j.model == model and j.batch == bs]
                if group:
                    runner.run_group(group)
                    meta["machine"]["loadavg_end"] = _loadavg()
                    report.write(data, out)
    except KeyboardInterrupt:
        log("interrupted: writing what was measured")
        for r in results:
            r.setdefault("status", "error")
            r.setdefault("error", "not run (interrupted)")
        return_code = 130
    else:
        return_code = 0
    finally:
        bar.close()
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    meta["quiet_wait_s"] = runner.quiet_wait_s
    meta["machine"]["loadavg_end"] = _loadavg()
    paths = report.write(data, out)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return return_code


if __name__ == "__main__":
    sys.exit(main())
