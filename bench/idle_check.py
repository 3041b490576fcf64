"""Do idle workers spin while another config is timed? ``python -m bench.idle_check``.

The runner (bench/runner.py) keeps every config's worker of a (model, batch) alive and
times them one after another; a worker whose threads keep spinning after its own round
would take a core from the one being timed. This starts the same workers the bench does
(``bench.measure``, same environment), lets every worker run a few calls and go idle, then
times each config in turn and reports how many cores every worker used meanwhile (CPU
time from /proc over the timed run's wall time): idle ones should show ~0.

    python -m bench.idle_check --model resnet50 --configs eager,fusepass,openvino,onnxruntime
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench.configs import CONFIGS
from bench.runner import Settings, Worker


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.idle_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--configs", default="eager,fusepass,openvino,onnxruntime")
    p.add_argument("--seconds", type=float, default=3.0, help="about this long per timed run")
    args = p.parse_args(argv)
    import psutil

    names = [c for c in args.configs.split(",") if c]
    bad = [c for c in names if c not in CONFIGS or CONFIGS[c].env != "main"]
    if bad:
        p.error(f"not a main-env config: {bad}")
    s, logs = Settings(), Path(tempfile.mkdtemp(prefix="bench-idle-"))
    workers, est = {}, {}
    try:
        for n in names:
            spec = {"model": args.model, "batch": args.batch, "config": n, "threads": s.threads,
                    "seed": 0, "attn": "sdpa", "warmup": 3, "warmup_s": 1.0, "prewarm": False}
            w = Worker(spec, sys.executable, logs / f"{n}.log", s)
            workers[n] = w
            msg = w.recv(s.compile_timeout)
            if msg["event"] != "ready":
                print(f"{n}: {msg.get('error')}")
                return 1
            est[n] = msg["est_ms"]
            print(f"{n}: ready, ~{msg['est_ms']:.1f} ms/call", flush=True)

        def cpu(w):
            t = psutil.Process(w.proc.pid).cpu_times()
            return t.user + t.system

        print(f"\ncores used by each worker while one is timed ({args.model} bs{args.batch}, "
              f"machine {psutil.cpu_count()} cores):")
        print("| timed | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names))
        for active in names:
            for n, w in workers.items():  # as after their own rounds: ran, now idle
                if n != active:
                    w.send(cmd="run", iters=3, rewarm=0)
                    w.recv(s.run_timeout)
            before = {n: cpu(w) for n, w in workers.items()}
            t0 = time.monotonic()
            iters = max(3, int(1000 * args.seconds / max(est[active], 1e-3)))
            workers[active].send(cmd="run", iters=iters, rewarm=0)
            workers[active].recv(s.run_timeout)
            dt = time.monotonic() - t0
            print(f"| {active} ({dt:.1f} s) | "
                  + " | ".join(f"{(cpu(w) - before[n]) / dt:.3f}" for n, w in workers.items()) + " |",
                  flush=True)
        for w in workers.values():
            w.send(cmd="finish")
            w.recv(s.run_timeout)
    finally:
        for w in workers.values():
            w.kill()
            w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
