"""The graph schema of a saved fusepass model: an IR graph as JSON data, and back.

Why not pickle, Python source or ``torch.export``'s format: loading must never run code
from a file. Here a graph is plain data — nodes with an op kind, a target named as a
qualified op string (``"aten.add.Tensor"``, ``"fusepass.conv.default"``,
``"operator.getitem"``), args/kwargs as JSON with node references, dtypes and memory
formats by name — and a loader that resolves every target by lookup in an allowlist of
op namespaces (``NAMESPACES``), never by import or eval. Any op of those namespaces
serializes as it is (fusepass's own ops, the INT8 ones included, need no edit here);
``torch.export``'s serializer would also serialize our ops, but it wants an
ExportedProgram (a re-trace of a graph we already have) and a round trip through
its own IR before lowering could run.

Encoding of an argument (``encode``/``decode``): ``None``, bools, ints, strings and finite
floats are themselves; a list is a JSON list; anything else is a one-key object:
``{"node": name}``, ``{"tuple": [...]}``, ``{"dict": [[k, v], ...]}``, ``{"float": "nan"}``,
``{"dtype": "float32"}``, ``{"memory_format": "channels_last"}``, ``{"layout": "strided"}``,
``{"device": "cpu"}``, ``{"t": [shape, stride, dtype, offset]}`` (a tensor's spec, in
metas only). A node is ``{"name", "op", "target", "args", "kwargs", "meta"}``; its meta
keeps the spec of its value (``val``: a spec, a number, or lists/tuples of them, as the
op returns) and fusepass's string annotations (``fusepass_source``, ``fusepass_layout``).

The saved specs *are* the loaded graph's values (since format version 2): load builds
each node's ``meta["val"]`` as a meta tensor of its spec instead of re-deriving it by fake
propagation, which needs a FakeTensorMode and so imports ``torch._dynamo`` (~1.1 s of a
fresh process, plus ~0.4 s of propagation for ResNet-50). The target stages (lowering,
prepacking, in-place) read shapes, dtypes and strides only, and make the values of the
nodes they add on the meta device (``fusepass.ir.value_mode``). That every spec is what
its op computes is checked on load with ``Options.verify`` (``FUSEPASS_VERIFY=1``).
"""
from __future__ import annotations

import json
import math
import operator
import re

import torch
import torch.fx as fx
from torch.fx._lazy_graph_module import _LazyGraphModule


class DeployError(Exception):
    """Base of every error fusepass.save / fusepass.load / the compile cache raise."""


class SaveError(DeployError, ValueError):
    """The model (or its optimized graph) cannot be written in the saved format."""


class FormatError(DeployError, ValueError):
    """Not a readable fusepass file: truncated, corrupted, modified, or its graph does not
    check on load."""


class VersionError(FormatError):
    """A format version, torch or fusepass version this loader cannot serve."""


class UnknownOpError(FormatError):
    """The graph names an op outside the allowlist, or one this torch does not have."""


def _quantized_decomposed():
    from fusepass.ops import quantized_decomposed
    quantized_decomposed()


# namespace -> what makes its ops exist in this process (None: torch or fusepass has them)
NAMESPACES = {"aten": None, "prims": None, "fusepass": None, "quantized": None,  # int8 max pool
              "quantized_decomposed": _quantized_decomposed}
PYTHON_TARGETS = {"operator.getitem": operator.getitem}
META_KEYS = ("fusepass_source", "fusepass_layout")  # string annotations later passes read
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_FORMATS = {"contiguous_format": torch.contiguous_format, "channels_last": torch.channels_last,
            "channels_last_3d": torch.channels_last_3d, "preserve_format": torch.preserve_format}
_LAYOUTS = {"strided": torch.strided, "sparse_coo": torch.sparse_coo, "_mkldnn": torch._mkldnn}


def target_name(target) -> str:
    for name, t in PYTHON_TARGETS.items():
        if target is t:
            return name
    if isinstance(target, torch._ops.OpOverload):
        ns, _, op = target._schema.name.partition("::")
        if ns not in NAMESPACES:
            raise SaveError(f"op {target} is in namespace {ns!r}, not one the saved format "
                            f"allows ({sorted(NAMESPACES)})")
        return f"{ns}.{op}.{target._overloadname or 'default'}"
    raise SaveError(f"target {target!r} is neither an op of {sorted(NAMESPACES)} nor one of "
                    f"{sorted(PYTHON_TARGETS)}")


def resolve(name) -> object:
    """The op a saved target names: lookup in ``torch.ops.<allowed namespace>`` only."""
    if not isinstance(name, str):
        raise UnknownOpError(f"op name {name!r} is not a string")
    if name in PYTHON_TARGETS:
        return PYTHON_TARGETS[name]
    parts = name.split(".")
    if (len(parts) != 3 or parts[0] not in NAMESPACES
            or not all(_IDENT.match(p) and not p.startswith("__") for p in parts)):
        raise UnknownOpError(f"unknown op {name!r}: the saved format allows ops of "
                             f"{sorted(NAMESPACES)} and {sorted(PYTHON_TARGETS)}")
    ns, op, overload = parts
    if NAMESPACES[ns] is not None:
        NAMESPACES[ns]()
    try:
        target = getattr(getattr(getattr(torch.ops, ns), op), overload)
    except (AttributeError, RuntimeError) as e:
        raise UnknownOpError(f"unknown op {name!r}: this torch {torch.__version__} / fusepass "
                             f"has no such op ({type(e).__name__})") from None
    if not isinstance(target, torch._ops.OpOverload):
        raise UnknownOpError(f"{name!r} does not name an op overload")
    return target


def tensor_spec(t: torch.Tensor) -> list:
    return [list(t.shape), list(t.stride()), str(t.dtype).removeprefix("torch."),
            t.storage_offset()]


def encode(a, where: str = ""):
    if a is None or isinstance(a, (bool, int, str)):
        return a
    if isinstance(a, float):
        return a if math.isfinite(a) else {"float": repr(a)}
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if isinstance(a, list):  # immutable_list too
        return [encode(x, where) for x in a]
    if isinstance(a, tuple):
        return {"tuple": [encode(x, where) for x in a]}
    if isinstance(a, dict):
        return {"dict": [[encode(k, where), encode(v, where)] for k, v in a.items()]}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).removeprefix("torch.")}
    if isinstance(a, torch.memory_format):
        return {"memory_format": str(a).removeprefix("torch.")}
    if isinstance(a, torch.layout):
        return {"layout": str(a).removeprefix("torch.")}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, torch.Tensor):
        return {"t": tensor_spec(a)}
    raise SaveError(f"cannot save a {type(a).__name__} argument ({where})")


def _named(table, kind, name):
    if not isinstance(name, str) or name not in table:
        raise FormatError(f"unknown {kind} {name!r}")
    return table[name]


def decode(a, env: dict):
    """``encode``'s inverse; ``env`` maps node names to the nodes built so far. Anything
    else than the encodings above is a FormatError."""
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    if isinstance(a, list):
        return [decode(x, env) for x in a]
    if not (isinstance(a, dict) and len(a) == 1):
        raise FormatError(f"malformed argument {str(a)[:80]!r}")
    (kind, v), = a.items()
    if kind == "node":
        if v not in env:
            raise FormatError(f"argument refers to node {v!r}, not defined before its use")
        return env[v]
    if kind == "tuple" and isinstance(v, list):
        return tuple(decode(x, env) for x in v)
    if kind == "dict" and isinstance(v, list) and all(isinstance(p, list) and len(p) == 2 for p in v):
        return {decode(k, env): decode(x, env) for k, x in v}
    if kind == "float" and v in ("nan", "inf", "-inf"):
        return float(v)
    if kind == "dtype":
        return _named(_DTYPES, "dtype", v)
    if kind == "memory_format":
        return _named(_FORMATS, "memory format", v)
    if kind == "layout":
        return _named(_LAYOUTS, "layout", v)
    if kind == "device":
        if v != "cpu":
            raise FormatError(f"device {v!r}: fusepass graphs run on the CPU")
        return torch.device(v)
    if kind == "t" and isinstance(v, list) and len(v) == 4:
        return ("t", v)  # a tensor spec: only metas hold them
    raise FormatError(f"malformed argument {str(a)[:80]!r}")


def graph_to_json(gm: fx.GraphModule) -> str:
    nodes = []
    for n in gm.graph.nodes:
        if n.op == "get_attr" and not n.users:
            continue  # a constant a fold replaced (passes leave them to the last stages)
        if n.op not in ("placeholder", "get_attr", "call_function", "output"):
            raise SaveError(f"node {n.name}: {n.op} nodes are not part of the IR")
        where = f"node {n.name}"
        if n.op == "call_function":
            target = target_name(n.target)
        elif n.op == "get_attr":
            if not _IDENT.match(n.target) or not isinstance(getattr(gm, n.target, None), torch.Tensor):
                raise SaveError(f"{where}: get_attr {n.target!r} is not a tensor attribute")
            target = n.target
        else:
            target = None
        meta = {k: n.meta[k] for k in META_KEYS if isinstance(n.meta.get(k), str)}
        if n.op != "output" and "val" in n.meta:
            meta["val"] = encode(n.meta["val"], where + " meta")
        nodes.append({"name": n.name, "op": n.op, "target": target,
                      "args": encode(list(n.args), where), "kwargs": encode(dict(n.kwargs), where),
                      "meta": meta})
    return json.dumps({"nodes": nodes}, separators=(",", ":"), allow_nan=False)


def graph_from_json(text: str, tensors: dict) -> fx.GraphModule:
    """Rebuild the GraphModule: constants as buffers (as capture registers them), every
    node's ``meta["val"]`` the meta tensor of its saved spec (``_set_values``).

    It is a ``_LazyGraphModule`` (torch.fx's, what Dynamo and Inductor build): its
    ``recompile()`` only marks the Python code stale, and the code is generated when it is
    first needed (a call, ``.code``). The target stages after a read each recompile, and
    the ``PassManager`` recompiles after every pass: six code generations of ResNet-50's
    graph (~0.1 s) where one is used. ``deploy.finish`` generates it once at the end."""
    try:
        data = json.loads(text)
        items = data["nodes"]
        assert isinstance(items, list)
    except Exception as e:
        raise FormatError(f"graph is not valid JSON of the schema: {type(e).__name__}: {e}") from None
    root = torch.nn.Module()
    for name, t in tensors.items():
        if not (isinstance(name, str) and _IDENT.match(name) and isinstance(t, torch.Tensor)):
            raise FormatError(f"tensor entry {name!r} is not a named tensor")
        root.register_buffer(name, t, persistent=False)
    g, env, saved = fx.Graph(), {}, {}
    for item in items:
        try:
            _add_node(g, item, env, saved, tensors)
        except DeployError:
            raise
        except Exception as e:  # deep nesting, unhashable keys, ...: data, not a crash
            raise FormatError(f"malformed node {str(item)[:80]!r}: {type(e).__name__}") from None
    gm = _LazyGraphModule(root, g)
    _set_values(gm, saved)
    return gm


def _ident(name, what) -> str:
    """Names end up in the Python code fx generates (a placeholder's target is a parameter
    of ``forward``, a kwarg's key a keyword): only plain identifiers, or a file could
    write code into it."""
    if not (isinstance(name, str) and _IDENT.match(name) and not name.startswith("__")):
        raise FormatError(f"{what} {str(name)[:80]!r} is not a plain identifier")
    return name


def _add_node(g, item, env, saved, tensors):
    if not isinstance(item, dict) or set(item) != {"name", "op", "target", "args", "kwargs", "meta"}:
        raise FormatError(f"malformed node {str(item)[:80]!r}")
    name, op, target = _ident(item["name"], "node name"), item["op"], item["target"]
    args, kwargs, meta = item["args"], item["kwargs"], item["meta"]
    if not (isinstance(args, list) and isinstance(meta, dict) and name not in env):
        raise FormatError(f"malformed node {name!r}")
    if op != "call_function" and kwargs != {"dict": []}:
        raise FormatError(f"node {name}: only calls take keyword arguments")
    if op == "placeholder":
        n = g.create_node("placeholder", name, name=name)
    elif op == "get_attr":
        if not isinstance(target, str) or target not in tensors:
            raise FormatError(f"node {name}: get_attr of {str(target)[:80]!r}, which the file lacks")
        n = g.create_node("get_attr", target, name=name)
    elif op == "call_function":
        kw = decode(kwargs, env)
        if not isinstance(kw, dict):
            raise FormatError(f"node {name}: kwargs are not a dict")
        for k in kw:
            _ident(k, f"node {name}: keyword")
        n = g.create_node("call_function", resolve(target), tuple(decode(args, env)), kw,
                          name=name)
    elif op == "output":
        out = decode(args, env)
        if len(out) != 1:
            raise FormatError(f"node {name}: an output takes one argument")
        n = g.output(out[0])
    else:
        raise FormatError(f"node {name}: unknown node kind {str(op)[:40]!r}")
    if n.name != name:
        raise FormatError(f"node name {name!r} is taken")
    for k in META_KEYS:
        if isinstance(meta.get(k), str):
            n.meta[k] = meta[k]
    if op != "output" and "val" in meta:
        saved[n] = decode(meta["val"], env)
    env[name] = n


def _spec(spec, where):
    """A saved tensor spec, checked: [shape, strides, dtype, storage offset]."""
    shape, stride, dtype, off = spec
    if not (isinstance(shape, list) and isinstance(stride, list) and len(shape) == len(stride)
            and all(type(d) is int and d >= 0 for d in shape)
            and all(type(s) is int for s in stride) and type(off) is int and off >= 0):
        raise FormatError(f"{where}: malformed tensor spec {str(spec)[:80]!r}")
    return shape, stride, _named(_DTYPES, "dtype", dtype)


def _meta(spec, where):
    """The meta tensor a saved spec stands for (its storage offset does not matter to one)."""
    shape, stride, dtype = _spec(spec, where)
    return torch.empty_strided(shape, stride, dtype=dtype, device="meta")


def _value(v, where):
    """A decoded meta: tensor specs within lists/tuples become meta tensors."""
    if isinstance(v, tuple) and len(v) == 2 and v[0] == "t":
        return _meta(v[1], where)
    if isinstance(v, (list, tuple)):
        return type(v)(_value(x, where) for x in v)
    if v is None or isinstance(v, (bool, int, float)):
        return v
    raise FormatError(f"{where}: a value that is neither a tensor spec nor a number")


def _set_values(gm: fx.GraphModule, saved: dict):
    """Every node's ``meta["val"]`` from the file, as meta tensors (``fusepass.ir``: a
    loaded graph's values stand for CPU tensors): no fake propagation, so no
    FakeTensorMode and no ``torch._dynamo`` import. The specs are covered by the file's
    digest; a constant's must be its tensor's, an input's the file's input spec
    (``deploy.load``). Whether every op's spec is what the op computes is checked with
    ``Options.verify`` (``deploy.load`` runs ``pipeline.verify`` first: a FormatError)."""
    for n in gm.graph.nodes:
        if n.op == "output":
            continue
        where = f"node {n.name}"
        if n not in saved:
            raise FormatError(f"{where}: no value spec")
        v = _value(saved[n], where)
        if n.op == "placeholder" and not (isinstance(v, torch.Tensor) or (
                isinstance(v, (int, float)) and not isinstance(v, bool))):
            raise FormatError(f"{where}: an input without a tensor spec")
        if n.op == "get_attr":
            t = getattr(gm, n.target)
            if not (isinstance(v, torch.Tensor) and v.shape == t.shape and v.dtype == t.dtype
                    and v.stride() == t.stride()):
                raise FormatError(f"{where}: its spec is not its tensor's "
                                  f"{tuple(t.shape)}/{t.dtype}/{tuple(t.stride())}")
        n.meta["val"] = v
