"""Helpers over the one IR (functional ATen + fusepass ops, ``meta["val"]`` everywhere).

Small queries every pass needs: full positional arguments of an op node, the constant
tensor behind a ``get_attr``, registering a new constant, and filling ``meta["val"]`` for
nodes a pass creates (by running the op on the fake values of its inputs).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._pytree import tree_map


def full_args(node: fx.Node) -> list:
    """args + kwargs + schema defaults as one positional list (OpOverload targets)."""
    target = node.target
    schema = getattr(target, "_schema", None)
    if schema is None:
        return list(node.args)
    out = []
    for i, a in enumerate(schema.arguments):
        if i < len(node.args):
            out.append(node.args[i])
        elif a.name in node.kwargs:
            out.append(node.kwargs[a.name])
        elif a.has_default_value():
            out.append(a.default_value)
        else:
            out.append(None)
    return out


def val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def is_constant(gm: fx.GraphModule, node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr" and isinstance(
        getattr(gm, node.target, None), torch.Tensor)


def constant(gm: fx.GraphModule, node) -> torch.Tensor:
    return getattr(gm, node.target)


def fake_mode_of(gm: fx.GraphModule):
    """The fake mode of the graph's own values (never an ambient tracing context's)."""
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        if isinstance(v, FakeTensor):
            return v.fake_mode
    return None


def add_constant(gm: fx.GraphModule, tensor: torch.Tensor, hint: str, before: fx.Node,
                 source: str | None = None) -> fx.Node:
    """Register `tensor` on gm under a fresh name and return a get_attr node for it."""
    i = 0
    while hasattr(gm, f"_fp_{hint}_{i}") or f"_fp_{hint}_{i}" in gm._buffers:
        i += 1
    name = f"_fp_{hint}_{i}"
    gm.register_buffer(name, tensor, persistent=False)
    with gm.graph.inserting_before(before):
        n = gm.graph.get_attr(name)
    mode = fake_mode_of(gm)
    if mode is not None and tensor.layout == torch.strided:
        n.meta["val"] = mode.from_tensor(tensor, static_shapes=True)
    if source:
        n.meta["fusepass_source"] = source
    return n


_BATCH_NORM = {torch.ops.aten.native_batch_norm.default,
               torch.ops.aten._native_batch_norm_legit_no_training.default}


def as_cpu_kernel_writes(node: fx.Node, out):
    """``out`` (a fake result of ``node``) with the strides the CPU kernel really writes,
    where the fake kernel differs (measured, torch 2.13): ``native_batch_norm`` of an input
    that is contiguous and channels-last at once (C == 1, [N,C,1,1]) writes a contiguous
    result; the fake keeps the input's channels-last strides."""
    if node.target not in _BATCH_NORM or not isinstance(out, (tuple, list)):
        return out
    x = node.args[0].meta.get("val")
    if x is None or not x.is_contiguous():
        return out
    with out[0].fake_mode:
        y = torch.empty(out[0].shape, dtype=out[0].dtype, device=out[0].device)
    return out if y.stride() == out[0].stride() else (y, *out[1:])


def infer_meta(gm: fx.GraphModule, node: fx.Node):
    """Fill node.meta["val"] by running its target on the fake values of its inputs."""
    mode = fake_mode_of(gm)
    if mode is None:
        return

    def to_val(a):
        return a.meta["val"] if isinstance(a, fx.Node) else a

    args = tree_map(to_val, node.args) if node.op == "call_function" else ()
    kwargs = tree_map(to_val, node.kwargs)
    if node.op == "get_attr":
        node.meta["val"] = mode.from_tensor(getattr(gm, node.target), static_shapes=True)
    elif node.op == "call_function":
        with mode:
            node.meta["val"] = as_cpu_kernel_writes(node, node.target(*args, **kwargs))


def emit(gm: fx.GraphModule, node: fx.Node, target, args, kwargs=None, note=None) -> fx.Node:
    """Replace ``node`` by a call of ``target``: a kernel computing the same value, so it
    takes the node's meta (value, layout); ``note`` says why lowering chose that form."""
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target, tuple(args), kwargs or {})
    new.meta.update(node.meta)
    if note:
        new.meta["fusepass_lowering_note"] = note
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def is_output_value(node: fx.Node) -> bool:
    return any(u.op == "output" for u in node.users)


def erase_dead(gm: fx.GraphModule, nodes):
    """Erase the given nodes (and what becomes dead among them), last first."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in sorted((n for n in nodes if n in order), key=order.get, reverse=True):
        if not n.users and n.op != "output":
            gm.graph.erase_node(n)


def pin_constants(gm: fx.GraphModule) -> fx.GraphModule:
    """Make the final graph's constants plain instance attributes instead of buffers.

    fx's generated ``forward`` reads every constant as ``self.<name>`` on every call; a
    buffer is found only by ``nn.Module.__getattr__``, a Python function (EfficientNet-B0's
    164 constants: 116 us per call, hot), an instance attribute by a dict hit (8 us).
    Only for the finished graph: passes find constants among the buffers, and nothing
    needs a compiled graph's constants as buffers (no state_dict; prepacked weights tie
    it to its device anyway)."""
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target in gm._buffers:
            gm.__dict__[n.target] = gm._buffers.pop(n.target)
    return gm


def delete_unused_attrs(gm: fx.GraphModule):
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [k for k in gm._buffers if k.startswith("_fp_")]:
        if name not in used:
            del gm._buffers[name]


GETITEM = operator.getitem
