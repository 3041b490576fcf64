"""Deployment: ``fusepass.save`` / ``fusepass.load`` of an optimized model.

Why: re-tracing and re-optimizing in every process costs seconds (ResNet-50's first
call ~5-7 s, Dynamo 2-3 s of it). A saved file holds the optimized graph in its
*target-neutral* form — the stages up to ``propagate_layout`` (``NEUTRAL_STAGES``:
folds, fusion into ``fusepass::conv/linear`` with post-op chains, layout decided), before
``lower``/``prepack_weights``/``inplace_pointwise`` — with its folded dense weights, so
``load`` lowers for the CPU it runs on and prepacks once (a file written on an AVX-512 box
runs on an AVX2 one with that CPU's kernels). No Dynamo, no capture, no pass but those.

The file is one ``torch.save`` of a dict of plain data, read back with
``torch.load(weights_only=True)``:
``{"format": "fusepass", "version": 2, "meta": json, "graph": json, "tensors": {name:
tensor}, "digest": "crc32:…"}`` (files written before 2026-12-04 hold a sha256 there:
both are read). ``graph`` is ``fusepass/serialize.py``'s schema (targets
resolved by lookup in an allowlist of op namespaces: nothing in a file is code);
``meta`` holds the fusepass and torch versions, the options, the input specs (shape,
dtype, strides; every dim static), the output pytree spec and the report; ``digest``
covers meta, graph and every tensor's bytes, so a truncated, corrupted or modified file
is refused instead of half-read (a deliberate forger can recompute it: it guards
against accidents; safety comes from loading data only). Why CRC-32 and not sha256: as
an unkeyed checksum either only catches accidents, and CRC-32 catches every burst of up
to 32 flipped bits and anything else but one change in 2^32; sha256 cost BERT-base's
load 0.24 s of 0.69 (438 MB), zlib's CRC-32 0.07 s (measured on Zen 5). The tensors are
memory-mapped (``torch.load(mmap=True)``: copy-on-write, the file is never written),
not copied: 0.05 s instead of 0.22 s for BERT's. The compile cache's *keys* stay sha256
(``cache.py``): there a collision would serve another model's weights.

The compile cache (``fusepass/cache.py``) stores the same format.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import tempfile
import zlib

import torch
import torch.fx as fx
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.utils import _pytree as pytree

from fusepass.capture import capture, lift_module
from fusepass.options import OptionError, Options
from fusepass.pipeline import NEUTRAL_STAGES, TARGET_STAGES, run_pipeline, same_strides, verify
from fusepass.report import Decision, Report
from fusepass.serialize import (DeployError, FormatError, SaveError, VersionError,
                                graph_from_json, graph_to_json, tensor_spec)

FORMAT = "fusepass"
VERSION = 2  # of the file layout and the graph schema; bump on any change to either
# 2: node value specs are the loaded values (meta tensors), not re-derived by fake propagation
NOT_SAVED = ("check", "verify", "cache_dir")  # per-process options, not part of a model


class InputMismatchError(DeployError, ValueError):
    """A loaded model called with inputs other than the ones it was saved for."""


def fusepass_version() -> str:
    try:
        return importlib.metadata.version("fusepass")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


def _release(v: str) -> tuple:
    """(major, minor, patch) of a version string, local suffixes ("+cpu") dropped."""
    out = []
    for part in v.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
        out.append(int(digits) if digits else 0)
    return tuple(out + [0] * (3 - len(out)))


def options_json(options: Options) -> dict:
    out = {}
    for name in options.__dataclass_fields__:
        if name in NOT_SAVED:
            continue
        v = getattr(options, name)
        out[name] = sorted(v) if isinstance(v, frozenset) else v
    return out


def input_spec(v):
    """A tensor input's spec; a number input (Dynamo's sizes under dynamic=True, in cache
    entries only: ``save`` takes tensors) is its value, which the graph was built for."""
    return tensor_spec(v) if isinstance(v, torch.Tensor) else v


def tensor_bytes(t: torch.Tensor):
    """``t``'s elements in logical order as a byte buffer (a copy when not contiguous)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


class _Crc32:
    """hashlib's update/hexdigest over zlib.crc32 (the digest's parts are chained)."""
    def __init__(self):
        self.value = 0

    def update(self, data):
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"crc32:{self.value:08x}"


DIGESTS = {"crc32": _Crc32, "sha256": hashlib.sha256}  # sha256: the files before crc32


def digest_kind(digest: str) -> str | None:
    """Which algorithm a stored digest was made with (None: not one this fusepass reads)."""
    if digest.startswith("crc32:"):
        return "crc32"
    if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
        return "sha256"
    return None


def digest_of(obj: dict, kind: str = "crc32") -> str:
    """What ``digest`` holds: a checksum of format, version, meta, graph and every tensor
    (name, spec, bytes) in name order; ``kind`` names the algorithm (``DIGESTS``)."""
    h = DIGESTS[kind]()
    h.update(f"{obj['format']}\0{obj['version']}\0".encode())
    h.update(obj["meta"].encode() + b"\0" + obj["graph"].encode() + b"\0")
    for name in sorted(obj["tensors"]):
        t = obj["tensors"][name]
        h.update(f"{name}\0{tensor_spec(t)}\0".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def _constants(gm: fx.GraphModule, external=frozenset()) -> dict:
    out = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.users and n.target not in out and n.target not in external:
            t = getattr(gm, n.target).detach()
            if t.layout != torch.strided:
                raise SaveError(f"constant {n.target} is {t.layout}: only dense tensors are saved")
            if t.untyped_storage().nbytes() > t.numel() * t.element_size():
                t = t.clone()  # a view of a larger buffer: save its elements, not the buffer
            out[n.target] = t
    return out


def payload(gm: fx.GraphModule, options: Options, out_spec, report: Report,
            extra: dict | None = None, external=()) -> dict:
    """The dict a file holds, for the target-neutral graph ``gm``. ``external`` (the
    compile cache only) names constants left out of the file, listed in
    ``extra["captured"]``: the captured graph's own tensors, which the entry's key covers
    by content (``cache.py``) and ``read_graph`` takes from the captured graph."""
    if external:
        extra = {**(extra or {}), "captured": sorted(external)}
    inputs = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    if not all(isinstance(v, (torch.Tensor, int, float)) for v in inputs):
        raise SaveError("every input of a saved graph must be a tensor or a number")
    spec = None
    if out_spec is not None:
        try:
            spec = pytree.treespec_dumps(out_spec)
        except Exception as e:
            raise SaveError(f"the output structure {out_spec.type} cannot be saved: {e}") from None
    meta = {"fusepass_version": fusepass_version(), "torch_version": torch.__version__,
            "options": options_json(options), "inputs": [input_spec(v) for v in inputs],
            "out_spec": spec, "report": [[d.stage, d.rule, d.node, d.action, d.reason]
                                         for d in report.decisions], "extra": extra or {}}
    obj = {"format": FORMAT, "version": VERSION, "meta": json.dumps(meta, allow_nan=False),
           "graph": graph_to_json(gm), "tensors": _constants(gm, frozenset(external))}
    obj["digest"] = digest_of(obj)
    return obj


def write_atomic(obj: dict, path) -> None:
    """torch.save to a temporary file in the target's directory, then ``os.replace``: a
    reader sees the old file or the new one, never half of one."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-",
                               suffix=".part")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; a saved model is a plain file
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read(path) -> tuple[fx.GraphModule, dict]:
    """(the target-neutral graph with its constants and metas, the file's meta). Every
    way a file can be unreadable is a ``FormatError`` (``VersionError``,
    ``UnknownOpError``) saying which."""
    gm, meta, _ = read_graph(path)
    return gm, meta


def read_graph(path, captured: dict | None = None):
    """``read``, plus ``rebuild() -> GraphModule``: the same graph read again from the
    data already in memory (how ``finish`` undoes a failed target stage, instead of a
    graph copy before every stage). ``captured`` (the compile cache's hit) maps the names
    of the captured graph's constants to their tensors: an entry lists in
    ``meta["extra"]["captured"]`` the constants it did not store because they are the
    captured graph's own (``payload``'s ``external``), and they are taken from there."""
    path = os.fspath(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise FormatError(f"{path}: not a readable fusepass file (truncated or corrupted?): "
                          f"{type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise FormatError(f"{path}: not a fusepass file (no format marker)")
    if obj.get("version") != VERSION:
        raise VersionError(f"{path}: format version {obj.get('version')!r}; this fusepass "
                           f"{fusepass_version()} reads version {VERSION}")
    if not (isinstance(obj.get("meta"), str) and isinstance(obj.get("graph"), str)
            and isinstance(obj.get("tensors"), dict) and isinstance(obj.get("digest"), str)):
        raise FormatError(f"{path}: malformed fusepass file (missing or mistyped entries)")
    kind = digest_kind(obj["digest"])
    if kind is None:
        raise FormatError(f"{path}: unknown digest {obj['digest'][:20]!r} (neither crc32 nor sha256)")
    try:
        ok = digest_of(obj, kind) == obj["digest"]
    except Exception as e:
        raise FormatError(f"{path}: malformed tensors: {type(e).__name__}: {e}") from None
    if not ok:
        raise FormatError(f"{path}: contents do not match their digest: the file is corrupted "
                          "or was modified")
    try:
        meta = json.loads(obj["meta"])
        meta["inputs"], meta["options"], meta["report"]  # noqa: B018
    except Exception as e:
        raise FormatError(f"{path}: malformed metadata: {type(e).__name__}: {e}") from None
    check_versions(meta, path)
    tensors = dict(obj["tensors"])
    external = meta.get("extra", {}).get("captured", [])
    if external:
        if not (captured is not None and isinstance(external, list)
                and all(isinstance(k, str) and k in captured and k not in tensors for k in external)):
            raise FormatError(f"{path}: refers to constants of a captured graph that is not "
                              "this one (a cache entry is read with its captured graph only)")
        tensors.update({k: captured[k] for k in external})
    return graph_from_json(obj["graph"], tensors), meta, lambda: graph_from_json(obj["graph"], tensors)


def check_versions(meta: dict, path="") -> None:
    """Torch: the writer's major.minor (a graph is ATen ops of one release: schemas and
    decompositions change between minors; patch releases do not change them). fusepass:
    the writer's version or newer (a newer writer may use ops or post-ops this one lacks)."""
    saved_torch, saved_fp = str(meta.get("torch_version")), str(meta.get("fusepass_version"))
    if _release(saved_torch)[:2] != _release(torch.__version__)[:2]:
        raise VersionError(f"{path}: saved with torch {saved_torch}; this is torch "
                           f"{torch.__version__}: load it with torch "
                           f"{'.'.join(map(str, _release(saved_torch)[:2]))}.x or save it again")
    if _release(saved_fp) > _release(fusepass_version()):
        raise VersionError(f"{path}: saved by fusepass {saved_fp}, newer than this fusepass "
                           f"{fusepass_version()}: upgrade fusepass to load it")


def saved_options(meta: dict, overrides: dict, path="") -> Options:
    try:
        saved = {k: v for k, v in dict(meta["options"]).items() if k not in NOT_SAVED}
        return Options.from_kwargs({**saved, **overrides})
    except OptionError as e:
        if set(overrides) - set(Options.__dataclass_fields__):
            raise
        raise VersionError(f"{path}: saved options this fusepass cannot serve: {e}") from None


def saved_decisions(meta: dict, path="") -> list:
    try:
        return [Decision(*map(str, d)) for d in meta["report"]]
    except Exception as e:
        raise FormatError(f"{path}: malformed report: {e}") from None


def check_graph(gm: fx.GraphModule, options: Options, path="") -> None:
    """With ``Options.verify``: every value spec of a read graph is what its op computes on
    its inputs' (``pipeline.verify``'s fake propagation). Without it the specs are trusted:
    they are covered by the digest, and that check costs a FakeTensorMode (the import of
    ``torch._dynamo``) plus a propagation, most of what a load would pay."""
    if not options.verify:
        return
    try:
        verify(gm)
    except Exception as e:
        raise FormatError(f"{path}: the graph does not check on load: {type(e).__name__}: "
                          f"{str(e)[:300]}") from None


def finish(gm: fx.GraphModule, options: Options, report: Report, rebuild=None) -> fx.GraphModule:
    """The target stages (lower for this CPU, prepack, in-place) on a neutral graph. A
    failing pass is undone by ``rebuild()`` and a replay when given (``read_graph``'s:
    the file's graph read again), else from a snapshot taken before every stage. A read
    graph is a ``_LazyGraphModule`` (``serialize.graph_from_json``): its code is
    generated here, once, so the first call does not pay it."""
    gm = run_pipeline(gm, options, report, recapture=rebuild, stages=TARGET_STAGES)
    _LazyGraphModule.force_recompile(gm)
    return gm


def neutral(model: torch.nn.Module, example_inputs, options: Options, report: Report):
    """(target-neutral graph, captured) of ``model`` for ``example_inputs``: capture with
    weights frozen, then ``NEUTRAL_STAGES``, as ``optimize`` does."""
    if not isinstance(model, torch.nn.Module):
        raise SaveError(f"fusepass.save takes an nn.Module, not a {type(model).__name__}")
    from fusepass.api import _reads_training, training_sensitive
    names = {m: name or "(root)" for name, m in model.named_modules()}
    # modules whose flag changes what a call computes (api.training_sensitive); not the
    # root of a GraphModule (an exported or PT2E-converted graph was traced already)
    training = [names.get(m, "?") for m in training_sensitive(model) if m.training and not (
        m is model and isinstance(model, fx.GraphModule)) and _reads_training(type(m))]
    if training:
        raise SaveError(f"{len(training)} module(s) in training mode ({', '.join(training[:3])}"
                        "...): fusepass.save writes an inference graph; call model.eval()")
    inputs = list(example_inputs)
    bad = [i for i, a in enumerate(inputs) if not isinstance(a, torch.Tensor)]
    if bad:
        raise SaveError(f"example input(s) {bad} are not tensors: fusepass.save takes tensor "
                        "inputs only")
    lifted, weights = lift_module(model)
    full = weights() + inputs
    with torch.no_grad():
        cap = capture(lifted, full, freeze=True)
        if cap.state or cap.scalars:
            raise SaveError("the graph writes its own weights or reads 0-d tensor inputs as "
                            "numbers: not a graph fusepass.save can write")
        report.record("capture", "-", "-", "info", "weights frozen: fusepass.save writes an "
                      "inference graph (eval mode, no_grad)")
        gm = run_pipeline(cap.gm, options, report, stages=NEUTRAL_STAGES,
                          recapture=lambda: capture(lifted, full, freeze=True).gm)
    return gm, cap


def save(model: torch.nn.Module, path, example_inputs, **options) -> Report:
    """Optimize ``model`` for inference on ``example_inputs`` (their shapes, dtypes and
    strides: every dim static) and write the target-neutral graph with its folded weights
    to ``path`` in one file. Returns the report of what was folded and fused."""
    opts = Options.from_kwargs(options)
    report = Report()
    gm, cap = neutral(model, example_inputs, opts, report)
    write_atomic(payload(gm, opts, cap.out_spec, report), path)
    return report


def _out_spec(meta, path):
    if meta.get("out_spec") is None:
        return None
    try:
        return pytree.treespec_loads(meta["out_spec"])
    except Exception as e:  # an unregistered type is looked up, never imported
        raise FormatError(f"{path}: the output structure cannot be rebuilt here ({e}); if it "
                          "is a library's type (transformers' ModelOutput), import the module "
                          "that defines it before fusepass.load") from None


class LoadedModule(torch.nn.Module):
    """What ``fusepass.load`` returns: the graph lowered for this CPU; takes the inputs it
    was saved for (shapes, dtypes, strides) and nothing else. Inference only."""

    def __init__(self, gm, inputs, out_spec, report, meta):
        super().__init__()
        self.graph_module = gm
        self.input_specs = [(tuple(v.shape), tuple(v.stride()), str(v.dtype).removeprefix("torch."))
                            for v in inputs]
        self._dtypes = [v.dtype for v in inputs]
        self._out_spec = out_spec
        self.fusepass_report = report
        self.fusepass_meta = meta

    def check_inputs(self, args):
        if len(args) != len(self.input_specs):
            raise InputMismatchError(f"this model was saved for {len(self.input_specs)} "
                                     f"input(s), got {len(args)}")
        for i, (a, (shape, stride, dtype), dt) in enumerate(zip(args, self.input_specs, self._dtypes)):
            if not isinstance(a, torch.Tensor):
                raise InputMismatchError(f"input {i} is a {type(a).__name__}, saved for a tensor")
            if tuple(a.shape) != shape or a.dtype != dt or a.device.type != "cpu":
                raise InputMismatchError(
                    f"input {i} is {tuple(a.shape)}/{a.dtype}/{a.device}; the model was saved for "
                    f"{shape}/{dtype}/cpu (every dim static): save it again for these inputs")
            if not all(x == y for x, y, d in zip(a.stride(), stride, shape) if d > 1):
                raise InputMismatchError(
                    f"input {i} has strides {tuple(a.stride())}; the model was saved for {stride} "
                    "(layout was decided for them): pass a tensor laid out so (.contiguous() or "
                    ".to(memory_format=...)) or save again")

    def forward(self, *args):
        self.check_inputs(args)
        with torch.no_grad():
            out = self.graph_module(*args)
        return out if self._out_spec is None else pytree.tree_unflatten(out, self._out_spec)


def load(path, **options) -> LoadedModule:
    """Read a file ``fusepass.save`` wrote, lower its graph for this CPU (``options``
    override the saved ones: ``lowering="reference"``), prepack once. Never runs code
    from the file; every unreadable file is a ``FormatError`` saying why."""
    path = os.fspath(path)
    gm, meta, rebuild = read_graph(path)
    inputs = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    if not all(isinstance(v, torch.Tensor) for v in inputs):
        raise FormatError(f"{path}: a graph with number inputs is a cache entry, not a model")
    if meta["inputs"] != [input_spec(v) for v in inputs]:
        raise FormatError(f"{path}: the input specs disagree with the graph's")
    opts = saved_options(meta, options, path)
    check_graph(gm, opts, path)
    report = Report()
    report.decisions.extend(saved_decisions(meta, path))
    out_spec = _out_spec(meta, path)
    report.record("load", "-", "-", "info",
                  f"loaded {os.path.basename(path)} (saved by fusepass {meta['fusepass_version']}, "
                  f"torch {meta['torch_version']}); lowered here for "
                  f"{torch.backends.cpu.get_cpu_capability()}")
    gm = finish(gm, opts, report, rebuild)
    gm.fusepass_report = report
    return LoadedModule(gm, inputs, out_spec, report, meta)
