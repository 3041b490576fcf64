"""The compile cache: the target-neutral graph of a variant, kept across processes.

Why: every process pays capture + folding + fusion + layout again for the same model
(the rewrite engine is most of fusepass's compile time). With
``options={"cache_dir": ...}`` / ``FUSEPASS_CACHE_DIR`` / ``optimize(..., cache_dir=...)``
the runtime's variant build (``Compiled.build``, after capture and after the variant's
weight watch is taken) asks ``cached_pipeline`` instead of running the whole pipeline:
on a hit it reads the entry (``fusepass/deploy.py``'s file format) and runs only the target
stages (lower for this CPU, prepack, in-place); on a miss it runs the neutral stages,
writes the entry, then the target stages.

Staleness: the key holds a digest of the *contents* of every constant of the captured
graph, i.e. of the current weights (a sha256 over their bytes: ResNet-50 ~70 ms). We key
by content rather than store the graph unfolded and re-fold on the current weights: a
folded weight is an arbitrary float64 expression of source weights (BN into conv, chains
of constants), and replaying folds on new weights is what the passes themselves do — a
cache that re-folded would save little. Content keys cannot serve stale weights: a
changed weight is another key (a miss), whatever changed it and however the change was
made (in place, replaced tensor, ``load_state_dict``), and reverting to old weights hits
their old entry, which is right. The runtime still rebuilds a variant when its watch sees
a source weight change; that rebuild captures the new weights and so looks up a new key.

The rest of the key: the captured graph itself (its serialized form: ops, literal args,
every node's shape/dtype/strides — so input specs, grad mode and training flags, which
change the captured graph, are in it), the options that change the result (not
``check``/``verify``/``cache_dir``), the fusepass and torch versions (torch's git
version too), the CPU's ISA (torch's capability and /proc/cpuinfo's flags: fusion asks
which kernels this CPU has) and the thread count.

Why the key is the *captured* (ATen) graph and not Dynamo's torch-level one, although
keying before capture would let a hit skip capture too (~0.45 s of ResNet-18's ~2 s warm
first call): capture reads process state the torch-level graph does not show (the
default dtype of factory calls, SDPA backend flags, which decomposition runs), and
``optimize()`` on a symbolic_traced graph calls modules whose configuration is not in the
graph at all. The captured graph spells all of that out, so its key is exact.

What an entry stores: the neutral graph, and only the constants the neutral stages made
(folded weights); a constant they left as it was is the captured graph's own tensor (the
same object), and the entry lists its name instead (``meta["extra"]["captured"]``) and
takes it from the captured graph on a hit (``deploy.read_graph``). Why: BERT folds almost
nothing, and a hit then read 438 MB back (``torch.load`` ~0.4 s) and hashed them (the
entry's digest, ~0.3 s) right after the key had hashed the same bytes: each byte of a
hit is now hashed once. Why it is still safe: a referenced tensor is covered by the key
(its name, spec and bytes: the key hashes every used constant of the captured graph),
and an entry is read only under its own key, checked against the one it stores; so the
tensor taken from the captured graph has the bytes the entry was built from. What the
entry does store — graph, meta (the list of references included), folded weights — is
covered by its digest as before, so a corrupt entry is still refused. sha256 stays the
hash of both: on this CPU (AMD EPYC, SHA-NI) it runs 100 MB in ~0.1 s, blake2b in ~0.2 s.

An entry that cannot be read or whose stored key is not its name's is reported, deleted
and rebuilt, never served. Entries are written to a temporary file and ``os.replace``d:
two processes writing one entry leave one of two complete files. The directory is
bounded by ``FUSEPASS_CACHE_MAX_BYTES`` (default 2 GiB): after a write, the least
recently used entries (mtime, touched on every hit) go first.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time

import torch

from fusepass.deploy import (FORMAT, VERSION, check_graph, finish, fusepass_version, options_json, payload,
                             read_graph, saved_decisions, tensor_bytes, write_atomic)
from fusepass.pipeline import NEUTRAL_STAGES, run_pipeline
from fusepass.report import Report
from fusepass.serialize import DeployError, SaveError, graph_to_json, tensor_spec

SUFFIX = ".fusepass"
DEFAULT_MAX_BYTES = 2 << 30
STRAY_TEMP_SECONDS = 3600  # a temporary file older than this is a crashed writer's
ENTRY = 2  # what an entry holds; 2: constants the captured graph has are not stored


@functools.lru_cache(maxsize=None)
def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return ""


def key_of(gm, options) -> str:
    """The entry name of a captured graph (``SaveError`` when it cannot be serialized)."""
    h = hashlib.sha256()
    env = {"format": [FORMAT, VERSION, ENTRY], "fusepass": fusepass_version(),
           "torch": [torch.__version__, torch.version.git_version],
           "options": options_json(options),
           "cpu": [torch.backends.cpu.get_cpu_capability(), cpu_flags()],
           "threads": torch.get_num_threads()}
    h.update(json.dumps(env, sort_keys=True, default=str).encode() + b"\0")
    h.update(graph_to_json(gm).encode() + b"\0")
    for name, t in captured_constants(gm).items():  # the weights' contents, in graph order
        h.update(f"{name}\0{tensor_spec(t)}\0".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()[:40]


def captured_constants(gm) -> dict:
    """name -> tensor of every constant the captured graph uses, in graph order: what the
    key hashes, and what an entry may refer to instead of storing."""
    return {n.target: getattr(gm, n.target) for n in gm.graph.nodes
            if n.op == "get_attr" and n.users}


def max_bytes() -> int:
    try:
        return int(os.environ.get("FUSEPASS_CACHE_MAX_BYTES", DEFAULT_MAX_BYTES))
    except ValueError:
        return DEFAULT_MAX_BYTES


def cached_pipeline(gm, options, report: Report, recapture=None):
    """``run_pipeline`` through the cache in ``options.cache_dir``; records "cache hit" /
    "cache miss" (and why an entry was rebuilt) as info decisions at stage ``cache``."""
    root = os.fspath(options.cache_dir)
    try:
        key = key_of(gm, options)
    except SaveError as e:
        report.record("cache", "-", "-", "info", f"cache not used: {e}")
        return run_pipeline(gm, options, report, recapture)
    path = os.path.join(root, key + SUFFIX)
    captured = captured_constants(gm)
    if os.path.exists(path):
        try:
            neutral, meta, rebuild = read_graph(path, captured)
            if meta.get("extra", {}).get("key") != key:
                raise DeployError("the entry's stored key is not its name")
            decisions = saved_decisions(meta, path)
            check_graph(neutral, options, path)
        except DeployError as e:
            report.record("cache", "-", "-", "info", f"cache entry {key} unusable, rebuilt: {e}")
            _unlink(path)
        else:
            report.record("cache", "-", "-", "info", f"cache hit: {key} ({root})")
            report.decisions.extend(decisions)
            _touch(path)
            return finish(neutral, options, report, rebuild)
    else:
        report.record("cache", "-", "-", "info", f"cache miss: {key} ({root})")
    fresh = Report()
    gm = run_pipeline(gm, options, fresh, recapture, stages=NEUTRAL_STAGES)
    report.extend(fresh)
    # constants the neutral stages left as they were (BERT: nearly all its 438 MB) are the
    # captured graph's tensors: the key covers them by content, so the entry refers to them
    external = [name for name, t in captured_constants(gm).items() if captured.get(name) is t]
    try:
        os.makedirs(root, exist_ok=True)
        write_atomic(payload(gm, options, None, fresh, extra={"key": key}, external=external), path)
        evict(root, keep=path)
    except (OSError, DeployError) as e:  # a cache that cannot be written is no error
        report.record("cache", "-", "-", "info", f"cache entry {key} not written: {e}")
    return finish(gm, options, report)


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _touch(path):
    try:
        os.utime(path)
    except OSError:
        pass


def evict(root, keep=None, limit=None):
    """Delete least recently used entries until the directory holds at most ``limit``
    bytes (``max_bytes()``), never ``keep``; and temporary files of crashed writers."""
    limit = max_bytes() if limit is None else limit
    entries, now = [], time.time()
    for name in os.listdir(root):
        p = os.path.join(root, name)
        try:
            st = os.stat(p)
        except OSError:
            continue
        if name.startswith(".tmp-") and now - st.st_mtime > STRAY_TEMP_SECONDS:
            _unlink(p)
        elif name.endswith(SUFFIX):
            entries.append((st.st_mtime, st.st_size, p))
    total = sum(s for _, s, _ in entries)
    for _, size, p in sorted(entries):
        if total <= limit:
            break
        if keep is not None and os.path.abspath(p) == os.path.abspath(keep):
            continue
        _unlink(p)
        total -= size
