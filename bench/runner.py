"""The parent side: schedules worker processes and interleaves their timing rounds.

Why: on a shared 2-core machine the noise between two minutes is larger than the
differences we look for. So for one (model, batch) all configs are compiled first, one
worker at a time (compile time is never measured under contention), each in its own
process, and kept alive; then timing runs round by round, each round visiting every
config in a fresh random order, so drift hits all configs alike. Only one worker ever
runs at a time. When free memory runs low before all configs of a group are up, the
live ones are timed and closed first (their ``interleave_group`` then differs).

A worker that crashes, hangs past its timeout or reports an error becomes a result row
with ``status: "error"``; the run goes on.
"""
from __future__ import annotations

import json
import math
import os
import random
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent


# large blocks from the heap, never mmap'd (4 GiB threshold), and freed memory kept
# (16 GiB trim threshold): the allocator serves repeated activation sizes from memory
# that is already paged in
MALLOC_RETAIN = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"


@dataclass
class Settings:
    threads: int = 2
    rounds: int = 5
    iters: Optional[int] = None  # per config per round; None: from round_time
    round_time: float = 2.0  # seconds per config per round when iters is None
    min_iters: int = 1
    max_iters: int = 50
    warmup: int = 3  # at least this many warm-up calls after the first (compiling) one
    warmup_s: float = 3.0  # ... and up to this long
    rewarm_time: float = 0.2  # untimed calls (>= 1, <= 10) before each round's timed ones
    compile_timeout: float = 1800.0
    run_timeout: float = 900.0
    profile: int = 0  # profile this many calls per config after timing (0: off)
    attn: str = "sdpa"
    seed: int = 0
    min_free_gb: float = 6.0
    # the machine is shared: wait (up to quiet_timeout s) for the neighbours' CPU use to
    # drop below max_background cores before a compile or a round; a timed run during
    # which it was above that is discarded and redone (up to `retries` times, and only if
    # the machine could be quiet before it), then kept and flagged
    max_background: float = 0.5
    quiet_timeout: float = 60.0
    quiet_budget: float = 3600.0  # total seconds of waiting per run, then never wait again
    retries: int = 2
    omp_wait_policy: Optional[str] = None  # OMP_WAIT_POLICY for the workers; None: unset
    # glibc malloc keeps freed large blocks instead of returning them to the OS, for every
    # config alike (GLIBC_TUNABLES=MALLOC_RETAIN): no per-call page faults on fresh
    # activation-sized outputs, and no run-to-run variance from the allocator's history
    malloc_retain: bool = False
    fresh_cache: bool = True  # a fresh Inductor cache per worker: compile time is cold
    # before the model, compile the tiny net once with the same config and time it apart
    # (init_s): compile_s is then the model's own compile, not the process's one-time
    # imports and first-use set-up, which every torch.compile config pays once
    prewarm: bool = True
    ipex_python: Optional[str] = None


class WorkerDied(RuntimeError):
    pass


class Worker:
    """One ``python -m bench.measure`` process and its two pipes."""

    def __init__(self, spec: dict, python: str, log_path: Path, settings: Settings):
        self.spec, self.log_path = spec, log_path
        p2c_r, p2c_w = os.pipe()
        c2p_r, c2p_w = os.pipe()
        env = dict(os.environ)
        env.update(OMP_NUM_THREADS=str(settings.threads), MKL_NUM_THREADS=str(settings.threads),
                   PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]),
                   PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        if settings.omp_wait_policy:
            env["OMP_WAIT_POLICY"] = settings.omp_wait_policy.upper()
        if settings.malloc_retain:
            env["GLIBC_TUNABLES"] = MALLOC_RETAIN
        self.cache_dir = None
        if settings.fresh_cache:
            self.cache_dir = tempfile.mkdtemp(prefix="bench-inductor-")
            env["TORCHINDUCTOR_CACHE_DIR"] = self.cache_dir
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [python, "-m", "bench.measure", json.dumps(spec), str(p2c_r), str(c2p_w)],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self.log,
            stderr=subprocess.STDOUT, pass_fds=(p2c_r, c2p_w))
        os.close(p2c_r)
        os.close(c2p_w)
        self.wfd, self.rfd, self.buf = p2c_w, c2p_r, b""

    def send(self, **msg):
        try:
            os.write(self.wfd, (json.dumps(msg) + "\n").encode())
        except OSError as e:
            raise WorkerDied(self.death(f"cannot write to worker: {e}")) from None

    def recv(self, timeout: float, tick: Optional[Callable[[], None]] = None) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise WorkerDied(self.death(f"timed out after {timeout:.0f} s"))
            ready, _, _ = select.select([self.rfd], [], [], min(left, 1.0))
            if tick:
                tick()
            if ready:
                chunk = os.read(self.rfd, 1 << 16)
                if not chunk:
                    raise WorkerDied(self.death("worker exited"))
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def death(self, what: str) -> str:
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        how = {None: "still running", -9: "killed by SIGKILL (out of memory?)"}.get(
            code, f"signal {-code}" if code is not None and code < 0 else f"exit code {code}")
        self.log.flush()
        try:
            tail = Path(self.log_path).read_text(errors="replace").strip().splitlines()[-8:]
        except OSError:
            tail = []
        return f"{what} ({how}); log tail: " + " | ".join(tail)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self):
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
        for fd in (self.wfd, self.rfd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.log.close()
        if self.cache_dir:
            shutil.rmtree(self.cache_dir, ignore_errors=True)


class CpuMeter:
    """Cores used by the rest of the machine (everything but ``pid`` and its descendants)
    between ``start`` and ``stop``. The other engineers' jobs on a 2-core box are the
    largest noise source there is: with 2 OpenMP threads, one busy neighbour can make a
    ResNet run 10x slower (threads spin at barriers while their partner is descheduled),
    so every measurement records how busy the machine was."""

    def __init__(self, pid: Optional[int] = None):
        try:
            import psutil
        except ImportError:  # pragma: no cover
            psutil = None
        self.psutil, self.pid = psutil, pid

    def _busy(self) -> float:
        t = self.psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) \
            - getattr(t, "guest_nice", 0.0)

    def _ours(self) -> float:
        if self.pid is None:
            return 0.0
        total = 0.0
        try:
            root = self.psutil.Process(self.pid)
            procs = [root] + root.children(recursive=True)
        except self.psutil.Error:
            return 0.0
        for p in procs:
            try:
                c = p.cpu_times()
                total += c.user + c.system + c.children_user + c.children_system
            except self.psutil.Error:
                pass
        return total

    def start(self):
        if self.psutil:
            self.t0, self.busy0, self.ours0 = time.monotonic(), self._busy(), self._ours()
        return self

    def stop(self) -> Optional[float]:
        if not self.psutil:
            return None
        dt = time.monotonic() - self.t0
        other = (self._busy() - self.busy0) - (self._ours() - self.ours0)
        return max(0.0, other / dt) if dt > 0 else None


def wait_quiet(threshold: float, timeout: float, window: float = 1.0,
               tick: Optional[Callable[[float], None]] = None) -> tuple:
    """Wait until the machine's CPU use (we are idle meanwhile) is below ``threshold``
    cores over one ``window``, or ``timeout`` passes. Returns (seconds waited, last load)."""
    t0, load = time.monotonic(), None
    if timeout <= 0:
        return 0.0, None
    while True:
        m = CpuMeter().start()
        if m.psutil is None:
            return 0.0, None
        time.sleep(window)
        load = m.stop()
        waited = time.monotonic() - t0
        if load is None or load < threshold or waited >= timeout:
            return waited, load
        if tick:
            tick(load)


def source_state() -> dict:
    """The fusepass code a worker is about to import: HEAD and a hash of the working tree's
    fusepass/, passes/, patterns/ sources. The tree is shared and edited while the bench
    runs, so each row records what it measured."""
    import hashlib
    h = hashlib.sha1()
    for folder in ("fusepass", "passes", "patterns"):
        for f in sorted((ROOT / folder).rglob("*.py")):
            h.update(str(f.relative_to(ROOT)).encode())
            try:
                h.update(f.read_bytes())
            except OSError:
                pass
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fusepass", "passes", "patterns"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.TimeoutExpired):
        head, dirty = "?", []
    return {"git_head": head, "uncommitted": len(dirty), "source_hash": h.hexdigest()[:10]}


def latency_stats(ms: list) -> dict:
    import numpy as np
    a = np.asarray(ms, dtype=float)
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "iqr": float(q3 - q1),
            "mean": float(a.mean()), "min": float(a.min()), "n": int(a.size)}


def free_gb() -> float:
    try:
        import psutil
        return psutil.virtual_memory().available / 2**30
    except ImportError:  # pragma: no cover
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) / 2**20


@dataclass
class Job:
    model: str
    batch: int
    config: str
    python: str
    result: dict = field(default_factory=dict)
    worker: Optional[Worker] = None
    iters: int = 0
    rewarm: int = 1
    steps: int = 0  # progress steps done; a job has 2 + rounds (compile, rounds, finish)


class Runner:
    def __init__(self, settings: Settings, out_dir: Path, progress, log: Callable[[str], None]):
        self.s, self.out_dir, self.progress, self.log = settings, out_dir, progress, log
        self.rng = random.Random(settings.seed)
        self.interleave_group = 0
        self.live = sys.stderr.isatty()  # tick the progress bar every second while compiling
        self.quiet_wait_s = 0.0
        self.retry_ok = True
        self.gate_timeout = settings.quiet_timeout  # halves after each wait that timed out

    def _spec(self, job: Job) -> dict:
        return {"model": job.model, "batch": job.batch, "config": job.config,
                "threads": self.s.threads, "seed": self.s.seed, "attn": self.s.attn,
                "warmup": self.s.warmup, "warmup_s": self.s.warmup_s, "prewarm": self.s.prewarm}

    def step(self, job: Job, settle: bool = False):
        n = (2 + self.s.rounds - job.steps) if settle else 1
        job.steps += n
        self.progress.update(n)

    def _fail(self, job: Job, stage: str, error: str, tb: str = ""):
        self.step(job, settle=True)
        job.result.update(status="error", stage=stage, error=error)
        if tb:
            job.result["traceback"] = tb
        self.log(f"  ERROR {job.model} bs{job.batch} {job.config} [{stage}]: {error[:300]}")
        if job.worker:
            job.worker.kill()
            job.worker.close()
            job.worker = None

    def quiet(self, job: Optional[Job] = None, timeout: Optional[float] = None) -> bool:
        """Wait for the neighbours to calm down (see Settings.max_background)."""
        def tick(load):
            if self.live:
                self.progress.set_postfix_str(f"waiting for a quiet machine ({load:.1f} cores busy)",
                                              refresh=True)
        budget = max(0.0, self.s.quiet_budget - self.quiet_wait_s)
        timeout = min(budget, self.gate_timeout if timeout is None else timeout)
        waited, load = wait_quiet(self.s.max_background, timeout, tick=tick)
        self.progress.set_postfix_str("")
        self.quiet_wait_s += waited
        if job is not None:
            job.result["quiet_wait_s"] = job.result.get("quiet_wait_s", 0.0) + waited
        # Redoing a busy run only helps if the machine can be quiet at all right now
        self.retry_ok = timeout > 0 and load is not None and load < self.s.max_background
        if timeout > 0:  # a machine that stays busy is not waited for as long next time
            self.gate_timeout = self.s.quiet_timeout if self.retry_ok else max(
                min(5.0, self.s.quiet_timeout), self.gate_timeout / 2)
        return self.retry_ok

    def start(self, job: Job):
        self.progress.set_description(f"{job.model} bs{job.batch} {job.config}: compiling")
        log_path = self.out_dir / "logs" / f"{job.model}_bs{job.batch}_{job.config}.log"
        job.result["log"] = str(log_path.relative_to(self.out_dir))
        self.quiet(job)
        job.result["code"] = source_state()
        job.worker = Worker(self._spec(job), job.python, log_path, self.s)
        meter = CpuMeter(job.worker.proc.pid).start()
        t0 = time.monotonic()

        def tick():
            self.progress.set_postfix_str(f"{time.monotonic() - t0:.0f} s", refresh=True)

        try:
            msg = job.worker.recv(self.s.compile_timeout, tick if self.live else None)
        except WorkerDied as e:
            return self._fail(job, "compile", str(e))
        finally:
            self.progress.set_postfix_str("")
        if msg.get("event") == "error":
            return self._fail(job, msg.get("stage", "?"), msg.get("error", "?"), msg.get("traceback", ""))
        msg.pop("event")
        job.result.update(status="ok", **msg)
        job.result["compile_background_cores"] = meter.stop()
        if self.s.iters:
            job.iters = self.s.iters
        else:
            est = max(msg["est_ms"], 1e-3)
            job.iters = int(min(self.s.max_iters, max(self.s.min_iters,
                                                      math.ceil(1000 * self.s.round_time / est))))
        # untimed calls before each round's timed ones; a call of seconds hardly notices
        # the ~20 ms it takes to wake an idle worker up, and is too costly to repeat
        job.rewarm = 0 if msg["est_ms"] > 2000 else int(
            min(10, max(1, math.ceil(1000 * self.s.rewarm_time / max(msg["est_ms"], 1e-3)))))
        job.result.update(samples_ms=[], background_cores=[], discarded_runs=0, contaminated_runs=0)
        warn = (msg.get("info") or {}).get("warning")
        self.log(f"  {job.model} bs{job.batch} {job.config}: compile {msg['compile_s']:.1f} s, "
                 f"~{msg['est_ms']:.2f} ms/iter, rel err {msg['max_rel_err']:.2g}"
                 + (f"  WARNING: {warn}" if warn else ""))
        self.step(job)

    def run_once(self, job: Job) -> bool:
        """One timed run of ``job`` in this round, redone while the machine was busy.
        Returns False when the worker failed."""
        for attempt in range(self.s.retries + 1):
            meter = CpuMeter(job.worker.proc.pid).start()
            try:
                job.worker.send(cmd="run", iters=job.iters, rewarm=job.rewarm)
                msg = job.worker.recv(self.s.run_timeout)
            except WorkerDied as e:
                self._fail(job, "timing", str(e))
                return False
            if msg.get("event") == "error":
                self._fail(job, msg.get("stage", "timing"), msg.get("error", "?"),
                           msg.get("traceback", ""))
                return False
            bg = meter.stop()
            busy = bg is not None and bg > self.s.max_background
            if busy and attempt < self.s.retries and self.retry_ok:
                job.result["discarded_runs"] += 1
                self.quiet(job)
                continue
            job.result["samples_ms"].extend(msg["ms"])
            job.result["background_cores"].append(bg)
            job.result["contaminated_runs"] += int(busy)
            return True
        return True

    def time_and_finish(self, jobs: list):
        live = [j for j in jobs if j.worker]
        self.interleave_group += 1
        for r in range(self.s.rounds):
            order = [j for j in live if j.worker]
            self.rng.shuffle(order)
            if order:
                self.quiet()
            for job in order:
                self.progress.set_description(
                    f"{job.model} bs{job.batch} {job.config}: round {r + 1}/{self.s.rounds}")
                if self.run_once(job):
                    self.step(job)
        for job in live:
            if not job.worker:
                continue
            self.progress.set_description(f"{job.model} bs{job.batch} {job.config}: finishing")
            try:
                job.worker.send(cmd="finish", profile=self.s.profile)
                msg = job.worker.recv(self.s.run_timeout)
            except WorkerDied as e:
                self._fail(job, "finish", str(e))
                continue
            if msg.get("event") == "error":
                self._fail(job, msg.get("stage", "finish"), msg.get("error", "?"))
                continue
            msg.pop("event")
            job.result.update(msg)
            job.result["latency_ms"] = latency_stats(job.result["samples_ms"])
            bgs = [b for b in job.result["background_cores"] if b is not None]
            job.result["background_cores_mean"] = sum(bgs) / len(bgs) if bgs else None
            job.result["interleave_group"] = self.interleave_group
            job.worker.close()
            job.worker = None
            self.step(job, settle=True)

    def run_group(self, jobs: list):
        """Compile every config of one (model, batch), then interleave their timing."""
        pending = [j for j in jobs if j.result.get("status") is None]
        started: list = []
        try:
            for job in pending:
                if any(j.worker for j in started) and free_gb() < self.s.min_free_gb:
                    self.log(f"  low memory ({free_gb():.1f} GB free): timing "
                             f"{[j.config for j in started if j.worker]} before {job.config}")
                    self.time_and_finish(started)
                    started = []
                self.start(job)
                if job.worker:
                    started.append(job)
            self.time_and_finish(started)
        finally:
            for job in jobs:
                if job.worker:
                    job.worker.kill()
                    job.worker.close()
                    job.worker = None
                    job.result.setdefault("status", "error")
                    job.result.setdefault("error", "interrupted")


def settings_dict(s: Settings) -> dict:
    return asdict(s)


def python_env_info(python: str, modules=("torch", "intel_extension_for_pytorch", "transformers"),
                    timeout: float = 300.0) -> dict:
    """Versions in another interpreter, or why it cannot run (import failures)."""
    code = ("import json, importlib\nout = {}\nfor m in %r:\n"
            "    try:\n        out[m] = importlib.import_module(m).__version__\n"
            "    except Exception as e:\n        out[m] = None; out[m + '_error'] = f'{type(e).__name__}: {e}'\n"
            "print('BENCH-ENV ' + json.dumps(out))\n") % (list(modules),)
    try:
        p = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=timeout,
                           cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    for line in p.stdout.splitlines():
        if line.startswith("BENCH-ENV "):
            return json.loads(line[len("BENCH-ENV "):])
    return {"error": (p.stderr or p.stdout).strip()[-500:]}


def default_ipex_python() -> Optional[str]:
    if os.environ.get("BENCH_IPEX_PYTHON"):
        return os.environ["BENCH_IPEX_PYTHON"]
    import importlib.util
    if importlib.util.find_spec("intel_extension_for_pytorch") is not None:
        return sys.executable
    cand = ROOT / ".venv-ipex" / "bin" / "python"
    return str(cand) if cand.exists() else None
