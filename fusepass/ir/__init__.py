"""Helpers over the one IR (functional ATen + fusepass ops, ``meta["val"]`` everywhere).

Small queries every pass needs: full positional arguments of an op node, the constant
tensor behind a ``get_attr``, registering a new constant, and filling ``meta["val"]`` for
nodes a pass creates (by running the op on the values of its inputs).

A graph's values are of one of two kinds. A captured graph's are FakeTensors of one
FakeTensorMode. A loaded graph's (``fusepass.load``, a compile-cache hit) are plain
*meta* tensors built from the file's specs: a FakeTensorMode imports ``torch._dynamo``
(~1.1 s in a fresh process), which a load must not pay. A plain meta tensor in a graph
always stands for a CPU tensor (files hold CPU graphs only; a captured graph's values are
never plain meta tensors). ``value_mode`` is where a pass makes new values of either kind.
"""
from __future__ import annotations

import contextlib
import operator

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._pytree import tree_leaves, tree_map


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


META = torch.device("meta")


def is_meta_value(v) -> bool:
    """A loaded graph's value: a plain meta tensor (not a FakeTensor) standing for a CPU one."""
    return isinstance(v, torch.Tensor) and not isinstance(v, FakeTensor) and v.is_meta


def is_cpu_value(v) -> bool:
    return v.device.type == "cpu" or is_meta_value(v)


def value_mode(gm: fx.GraphModule):
    """What new values of ``gm`` are made under: the fake mode of the graph's own values
    (never an ambient tracing context's), the meta device for a loaded graph, or None."""
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        if isinstance(v, FakeTensor):
            return v.fake_mode
        if is_meta_value(v):
            return META
    return None


def value_of(mode, t: torch.Tensor):
    """A value of ``mode``'s kind for the real tensor ``t`` (same shape, strides, dtype)."""
    if mode is META:
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
    return mode.from_tensor(t, static_shapes=True)


def run_on_values(mode, node_target, args, kwargs, node=None):
    """``node_target`` run on values (fake or meta) under ``mode``, with the strides the CPU
    kernel writes (``as_cpu_kernel_writes``; on meta values also the CPU convolution's
    layout choice, which the meta kernel does not make)."""
    with mode:
        out = node_target(*args, **kwargs)
    if mode is META and node_target in _CONVOLUTION:
        out = _cpu_conv_layout(out, args)
    return out if node is None else as_cpu_kernel_writes(node, out)


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
    mode = value_mode(gm)
    if mode is not None and tensor.layout == torch.strided:
        n.meta["val"] = value_of(mode, tensor)
    if source:
        n.meta["fusepass_source"] = source
    return n


_BATCH_NORM = {torch.ops.aten.native_batch_norm.default,
               torch.ops.aten._native_batch_norm_legit_no_training.default}
_aten = torch.ops.aten
# pointwise ops that allocate like empty_like(input) on the CPU: the input's strides
_KEEPS_INPUT = {_aten.hardtanh.default}
# their Python-number operand becomes a 0-d operand of the TensorIterator (then not all
# operands have the result's shape, and the result keeps its tensor operand's strides)
_NUMBER_OPERAND = {getattr(_aten, f"{op}").Tensor for op in ("add", "sub", "mul", "div")} | {
    getattr(_aten, f"{op}").Scalar for op in ("add", "sub", "mul", "div")}
# TensorIterator ops without the pointwise tag (leaky_relu has it from torch 2.9 on, not in 2.8)
_TI_ALLOCATING = {_aten.hardswish.default, _aten.leaky_relu.default}


def _pointwise(target) -> bool:
    """An out-of-place pointwise ATen op (an in-place one returns its operand)."""
    schema = getattr(target, "_schema", None)
    if schema is None or schema.is_mutable:
        return False
    return target in _TI_ALLOCATING or (
        torch.Tag.pointwise in getattr(target, "tags", ())
        and target not in (_aten.clone.default, _aten.copy.default))


def _number(a) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


def cpu_pointwise_strides(target, out, operands):
    """The strides the CPU kernel of the pointwise op ``target`` gives its result, where
    its fake kernel (strides from a stride sort) differs: only for operands that are
    contiguous and channels-last at once (a size-1 dim), so only the strides of size-1
    dims, which a later conv reads to choose its layout. ``operands``: the op's tensor and
    number operands, in order. Measured on torch 2.13 over unary, scalar and tensor-tensor
    forms of 22 ops, 14 shapes with size-1 dims, 1-d to 3-d layouts (every case but a
    broadcast operand first at batch 1; empty tensors not modelled):
    TensorIterator's fast setup, when every operand has the result's shape, allocates it
    contiguous if they all are contiguous ("ambiguous cases (NC11) are always treated as
    contiguous", TensorIterator.cpp), else channels-last if 4-d and all are; a Python
    number operand, or ``hardtanh`` (empty_like), keeps the tensor operand's strides.
    Returns None where the fake's strides stand."""
    if not isinstance(out, torch.Tensor) or out.numel() == 0 or not _pointwise(target):
        return None
    tensors = [a for a in operands if isinstance(a, torch.Tensor)]
    if not tensors:
        return None
    if target in _KEEPS_INPUT or (target in _NUMBER_OPERAND and any(map(_number, operands))):
        t = tensors[0]
        if len(tensors) == 1 and t.shape == out.shape and _dense(t):
            return tuple(t.stride())
        return None
    if any(tuple(t.shape) != tuple(out.shape) for t in tensors):
        return None
    if all(t.is_contiguous() for t in tensors):
        fmt = torch.contiguous_format
    elif out.dim() == 4 and all(t.is_contiguous(memory_format=torch.channels_last) for t in tensors):
        fmt = torch.channels_last
    else:
        return None
    return tuple(torch.empty(out.shape, device="meta", memory_format=fmt).stride())


def _dense(t) -> bool:
    from fusepass._compat import is_non_overlapping_and_dense
    return is_non_overlapping_and_dense(t)


def with_strides(v: torch.Tensor, strides) -> torch.Tensor:
    """A fake tensor of ``v``'s mode, shape and dtype with ``strides``."""
    with v.fake_mode:
        return torch.empty_strided(v.shape, strides, dtype=v.dtype, device=v.device)


def as_cpu_kernel_writes(node: fx.Node, out, args=None):
    """``out`` (a fake result of ``node``) with the strides the CPU kernel really writes,
    where the fake kernel differs (measured, torch 2.13): ``native_batch_norm`` of an input
    that is contiguous and channels-last at once (C == 1, [N,C,1,1]) writes a contiguous
    result; the fake keeps the input's channels-last strides. Pointwise ops: see
    ``cpu_pointwise_strides``. ``args``: the operand values, when not the meta of
    ``node``'s arguments."""
    if args is None:
        args = [a.meta.get("val") if isinstance(a, fx.Node) else a for a in node.args]
    if node.op != "call_function" or not isinstance(out, (torch.Tensor, tuple, list)):
        return out
    if isinstance(out, torch.Tensor):
        if not isinstance(out, FakeTensor):
            return out
        want = cpu_pointwise_strides(node.target, out, args)
        return out if want is None or want == tuple(out.stride()) else with_strides(out, want)
    if node.target not in _BATCH_NORM:
        return out
    x = args[0]
    if not isinstance(x, torch.Tensor) or not x.is_contiguous():
        return out
    with out[0].fake_mode if isinstance(out[0], FakeTensor) else contextlib.nullcontext():
        y = torch.empty(out[0].shape, dtype=out[0].dtype, device=out[0].device)
    return out if y.stride() == out[0].stride() else (y, *out[1:])


def restride(gm, new, written):
    """The kernel or in-place op ``new`` writes ``written``; where the strides its meta
    holds (eager's) differ in size-1 dims only, a free ``as_strided`` view gives them:
    the node's meta becomes what it writes, the view's eager's (a later conv reads even a
    size-1 dim's stride to choose its layout, and graph outputs keep eager's strides
    exactly). Returns the view, or ``new`` when the strides agree."""
    y = val(new)
    if not isinstance(y, torch.Tensor) or tuple(y.stride()) == tuple(written):
        return new
    truth = with_strides(y, written)
    if not _can_tell(new, truth):
        new.meta["val"] = truth  # no user's result changes: no view (EfficientNet: 32 of them)
        return new
    users = list(new.users)
    with gm.graph.inserting_after(new):
        view = gm.graph.call_function(_aten.as_strided.default,
                                      (new, list(y.shape), list(y.stride())))
    view.meta.update({k: v for k, v in new.meta.items() if k != "fusepass_lowering_note"})
    new.meta["val"] = truth
    for u in users:
        u.replace_input_with(new, view)
    return view


def _can_tell(node: fx.Node, new) -> bool:
    """Whether a user of ``node`` computes another result (its strides) when ``node``'s
    value is ``new`` instead of its meta: ATen and fusepass users are re-run on fake values
    with the CPU kernels' strides; graph outputs and anything else can tell."""
    for u in node.users:
        if u.op != "call_function" or getattr(u.target, "namespace", None) not in ("aten", "fusepass"):
            return True
        args = fx.node.map_arg(u.args, lambda a: new if a is node else a.meta["val"])
        kwargs = fx.node.map_arg(u.kwargs, lambda a: new if a is node else a.meta["val"])
        with new.fake_mode:
            out = as_cpu_kernel_writes(u, u.target(*args, **kwargs), list(args))
        got, want = tree_leaves(out), tree_leaves(u.meta.get("val"))
        if len(got) != len(want) or any(isinstance(g, torch.Tensor) and g.stride() != w.stride()
                                        for g, w in zip(got, want)):
            return True
    return False


def infer_meta(gm: fx.GraphModule, node: fx.Node):
    """Fill node.meta["val"] by running its target on the values of its inputs."""
    mode = value_mode(gm)
    if mode is None:
        return

    def to_val(a):
        return a.meta["val"] if isinstance(a, fx.Node) else a

    args = tree_map(to_val, node.args) if node.op == "call_function" else ()
    kwargs = tree_map(to_val, node.kwargs)
    if node.op == "get_attr":
        node.meta["val"] = value_of(mode, getattr(gm, node.target))
    elif node.op == "call_function":
        node.meta["val"] = run_on_values(mode, node.target, args, kwargs, node)


def suggest_memory_format(t) -> torch.memory_format:
    """``Tensor.suggest_memory_format()`` for static shapes: c10's
    ``is_channels_last_strides_2d/3d``, as ``torch._prims_common.suggest_memory_format``
    computes it, without its symbolic-shape guards (they import sympy: ~0.8 s of a
    fresh process's load)."""
    if t.layout != torch.strided or t.dim() not in (4, 5):
        return torch.contiguous_format
    shape, strides = t.shape, t.stride()
    if strides[1] == 0:
        return torch.contiguous_format
    low = 0
    for d in ([1, 3, 2, 0] if t.dim() == 4 else [1, 4, 3, 2, 0]):
        if shape[d] == 0 or strides[d] < low or (d == 0 and low == strides[1]):
            return torch.contiguous_format
        low = strides[d] * shape[d]
    return torch.channels_last if t.dim() == 4 else torch.channels_last_3d


_CONVOLUTION = {torch.ops.aten.convolution.default, torch.ops.aten._convolution.default}


def _cpu_conv_layout(out, args):
    """A meta convolution's result in the memory format the CPU kernel writes: the meta
    kernel always answers contiguous; FakeTensorMode asks ATen's backend choice, as done
    here with empty CPU tensors of the operands' specs (allocated, never touched)."""
    x, w, b, stride, padding, dilation, transposed, output_padding, groups = args[:9]

    def cpu(t):
        return None if t is None else torch.empty_strided(t.shape, t.stride(), dtype=t.dtype)

    x, w = cpu(x), cpu(w)
    backend = torch._C._select_conv_backend(x, w, cpu(b), stride, padding, dilation,
                                            transposed, output_padding, groups, None)
    if w.dim() == 3:  # as ATen and FakeTensorMode do: 1-d is decided as 2-d
        x, w = x.contiguous().unsqueeze(2), w.unsqueeze(2)
    fmt = torch._C._conv_determine_backend_memory_format(x, w, backend)
    if out.dim() == 3 and fmt == torch.channels_last:
        return out.unsqueeze(2).to(memory_format=fmt).squeeze(2)
    return out.to(memory_format=fmt)


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
