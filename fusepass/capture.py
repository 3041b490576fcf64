"""Capture: from a torch-level FX graph to the one IR every pass sees.

The only place that knows about spellings: dynamo's lifted parameters, ``nn.Module``
calls of a symbolic_traced graph, ``F.relu`` vs ``relu_``, in-place ops, grad-mode
switches inside the compiled function. Out comes a functional ATen graph with
``meta["val"]`` on every node, where
  * every convolution is ``fusepass::conv`` and every ``F.linear`` is ``fusepass::linear``
    (empty post-op chain): one spelling for the patterns, and a kernel for lowering;
  * weights (parameters and buffers) are ``get_attr`` constants when, and only when,
    the graph is used for inference (``inference_reason``) and the graph does not write
    them: a weight the graph writes is state (a training-mode BatchNorm's running
    statistics, ``num_batches_tracked``), not a constant, and stays a placeholder.
Both entry points first *lift* their graph to ``fn(*args)`` whose leading or marked
args are the weights, so the backend and ``optimize`` share everything after that.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.fx._lazy_graph_module import _LazyGraphModule
import torch.fx as fx
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from fusepass import ops as fp
from fusepass._compat import batch_norm_as_native, treespec_children

aten = torch.ops.aten
_LINEAR = {F.linear, torch._C._nn.linear, aten.linear.default}  # the last: PT2E graphs
_GRAD_ON = {torch._C._set_grad_enabled}


@dataclass
class Lifted:
    """A graph as a function of flat positional args; ``weights`` maps arg index -> name.
    ``attrs`` are weights the graph holds itself (``get_attr`` of real tensors): Dynamo
    installs parameters and buffers that way instead of lifting them when Inductor's
    freezing flag is on (``torch._inductor.config.freezing`` under no_grad) or
    ``torch._dynamo.config.prepare_freezing`` is set. They are constants to capture as
    they are, so the runtime must watch them by reference."""
    fn: Callable
    weights: dict  # int -> source name ("conv1.weight", "L['self']._modules[...]")
    graph: fx.Graph | None  # the torch-level graph, for the grad-mode analysis
    attrs: dict = field(default_factory=dict)  # get_attr target -> the tensor it holds
    readers: list | None = None  # per arg: the nodes of ``graph`` that read it


def lift_dynamo(gm: fx.GraphModule, example_inputs) -> Lifted:
    """Dynamo lifts parameters/buffers to placeholders; ``grapharg.source`` names them."""
    weights = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, (n, ex) in enumerate(zip(placeholders, example_inputs)):
        ga = n.meta.get("grapharg")
        src = ga.source.name if ga is not None and hasattr(ga, "source") else ""
        src = src() if callable(src) else src
        if isinstance(ex, torch.nn.Parameter) or "._parameters[" in src or "._buffers[" in src:
            weights[i] = src or n.name
    return Lifted(gm, weights, gm.graph, graph_attrs(gm), [[p] for p in placeholders])


def graph_attrs(gm: fx.GraphModule) -> dict:
    """The tensors a graph's ``get_attr`` nodes read, by target."""
    out = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target not in out:
            obj = gm
            for part in n.target.split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, torch.Tensor):
                out[n.target] = obj
    return out


def lift_module(gm: torch.nn.Module) -> tuple[Lifted, Callable[[], list]]:
    """A module's parameters and buffers become the leading args; returns a getter of
    their current tensors (re-read on every call, so replaced tensors are seen)."""
    names = [n for n, _ in gm.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in gm.named_buffers(remove_duplicate=False)]
    k = len(names)

    def fn(*args):
        return torch.func.functional_call(gm, dict(zip(names, args[:k])), tuple(args[k:]),
                                          tie_weights=False, strict=False)

    slots = []  # (the owning module's _parameters or _buffers dict, key): one lookup a call
    for n in names:
        owner, _, leaf = n.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        slots.append((mod._parameters if leaf in mod._parameters else mod._buffers, leaf))

    def current():  # a replaced Parameter or buffer is seen; a replaced submodule is not
        return [d[k] for d, k in slots]

    if not isinstance(gm, fx.GraphModule):
        return Lifted(fn, dict(enumerate(names)), None), current
    return Lifted(fn, dict(enumerate(names)), gm.graph, readers=_readers(gm, names)), current


def _readers(gm: fx.GraphModule, names: list) -> list:
    """Per arg of ``lift_module``'s function, the nodes of ``gm``'s graph that read it: a
    weight is read by its ``get_attr`` and by the ``call_module`` of its module or of any
    module above it (``layer1.0.conv1.weight``: ``layer1.0.conv1``, ``layer1.0``, ...), a
    user arg by its placeholder."""
    by_target: dict = {}
    for n in gm.graph.nodes:
        if n.op in ("get_attr", "call_module"):
            by_target.setdefault(n.target, []).append(n)
    readers = []
    for name in names:
        parts = name.split(".")
        readers.append([n for i in range(len(parts), 0, -1)
                        for n in by_target.get(".".join(parts[:i]), [])])
    return readers + [[n] for n in gm.graph.nodes if n.op == "placeholder"]


def lift_leaves(lifted: Lifted, spec) -> Lifted:
    """``lifted`` (weights leading, as ``lift_module`` makes it) as a function of its
    weights and the pytree leaves of its user args, ``spec`` their structure. make_fx
    flattens its inputs anyway, one placeholder per leaf: capturing this function makes
    the graph's placeholders and the args it is called with the same list."""
    k = len(lifted.weights)
    assert set(lifted.weights) == set(range(k)), "weights must be the leading args"

    def fn(*args):
        return lifted.fn(*args[:k], *pytree.tree_unflatten(list(args[k:]), spec))
    readers = None
    if lifted.readers is not None:  # a leaf is read where its container is
        readers = lifted.readers[:k] + [r for r, child in zip(lifted.readers[k:],
                                                               treespec_children(spec))
                                        for _ in range(child.num_leaves)]
    return Lifted(fn, lifted.weights, lifted.graph, lifted.attrs, readers)


def inference_reason(lifted: Lifted, args, eval_mode: bool = False) -> tuple[bool, str]:
    """(frozen?, why). Inference = no tensor that requires grad is used while grad is on.

    Grad mode is followed through the graph, so ``torch.no_grad()`` entered *inside* the
    compiled function counts (pytorch#125474)."""
    needs_grad = {i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad}
    attrs_grad = {k for k, t in lifted.attrs.items() if t.requires_grad}
    if not needs_grad and not attrs_grad:
        return True, "no input or parameter requires grad"
    if not torch.is_grad_enabled():
        return True, "grad is disabled"
    if eval_mode:
        return True, "module is in eval mode (optimize() is an inference request)"
    if lifted.graph is None or lifted.readers is None:
        return False, "grad is enabled and parameters require grad"
    tainted = {n for i in needs_grad for n in lifted.readers[i]}  # a call_module reads its own
    tainted |= {n for n in lifted.graph.nodes if n.op == "get_attr" and n.target in attrs_grad}
    enabled = True
    for n in lifted.graph.nodes:
        if n.op == "call_function" and n.target in _GRAD_ON:
            enabled = bool(n.args[0])
        elif n.op == "call_function" and "inference_mode" in getattr(n.target, "__name__", ""):
            enabled = "exit" in n.target.__name__
        elif n.op not in ("placeholder", "output", "get_attr"):
            if n in tainted or any(a in tainted for a in n.all_input_nodes):
                if enabled:
                    return False, (f"grad is enabled at {n.name} and it uses a tensor that "
                                   "requires grad: nothing frozen or fused (use torch.no_grad())")
    return True, "every use of a grad-requiring tensor runs under no_grad"


class _Canonical(TorchFunctionMode):
    """During capture, ``F.linear`` becomes one ``fusepass::linear`` node instead of
    ATen's view/t/addmm decomposition."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LINEAR:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if w.dim() == 2 and x.dim() >= 1:
                return fp.linear(*_autocast_cast(x, w, b), None, [], [])
        return func(*args, **kwargs)


def _autocast_cast(*tensors):
    """What CPU autocast does to ``F.linear``'s operands (it is in autocast's
    lower-precision list): floating tensors but float64 cast to the autocast dtype.
    ``fusepass::linear`` has no autocast kernel, so without this a linear inside an
    autocast region would mix a bf16 input with an fp32 weight."""
    if not torch.is_autocast_enabled("cpu"):
        return tensors
    dt = torch.get_autocast_dtype("cpu")
    return tuple(t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point()
                 and t.dtype is not torch.float64 and t.device.type == "cpu" else t
                 for t in tensors)


def _edge_dtypes(lifted, fake, freeze):
    """The dtypes of the outputs without autocast: a fake run of the function, so a
    ``precision`` autocast keeps the dtypes the graph's edges have in eager."""
    with _Canonical(), (torch.no_grad() if freeze else torch.enable_grad()):
        out = lifted.fn(*fake)
    return [getattr(o, "dtype", None) for o in pytree.tree_leaves(out)]


@dataclass
class Captured:
    gm: fx.GraphModule  # ATen IR; placeholders = the non-weight args, in order
    out_spec: Any  # pytree spec of the original output
    user_idx: list  # arg positions that are placeholders of gm
    state: dict = field(default_factory=dict)  # weight arg -> why: weights the graph writes
    state_attrs: dict = field(default_factory=dict)  # the same for graph-attribute weights
    scalars: list = field(default_factory=list)  # 0-d tensor args the graph reads as numbers


BN_TRAINING = "BatchNorm in training mode updates its statistics"
# The training-mode batch norms that update their running statistics in place without
# their schema saying so (torch 2.13 captures native_batch_norm, torch 2.8 — the IPEX env —
# _native_batch_norm_legit); args 3, 4 are the statistics, 5 the training flag in each.
BN_UPDATING = (aten.native_batch_norm.default, aten._native_batch_norm_legit.default)


def written(gm: fx.GraphModule) -> dict:
    """The nodes whose tensors the graph writes, with why: the arguments an op's schema
    marks ``Tensor(a!)`` (functionalize leaves a ``copy_`` into every input the function
    mutates) and the running statistics a training-mode ``native_batch_norm`` updates,
    which its schema does not declare."""
    out = {}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in BN_UPDATING and n.args[5]:
            out.update((a, BN_TRAINING) for a in n.args[3:5] if isinstance(a, fx.Node))
        schema = getattr(n.target, "_schema", None)
        for i, a in enumerate(schema.arguments if schema is not None else ()):
            if a.alias_info is not None and a.alias_info.is_write:
                arg = n.args[i] if i < len(n.args) else n.kwargs.get(a.name)
                if isinstance(arg, fx.Node):
                    out.setdefault(arg, "the graph writes it")
    return out


def capture(lifted: Lifted, args: list, freeze: bool, autocast=None) -> Captured:
    """``autocast``: a dtype to trace the function under ``torch.autocast("cpu", dtype)``
    (``Options.precision``, decided by ``fusepass/precision.py``), outputs cast back to
    the dtypes they have without it."""
    spec = {}

    def flat(*a):
        with _Canonical(), (torch.autocast("cpu", autocast) if autocast is not None
                            else contextlib.nullcontext()):
            out = lifted.fn(*a)
        leaves, spec["out"] = pytree.tree_flatten(out)
        if autocast is not None:
            leaves = [o.to(d) if isinstance(o, torch.Tensor) and d is not None and o.dtype != d
                      else o for o, d in zip(leaves, spec["edges"])]
        return leaves

    # Our own static fake mode, outside dynamo's tracing context: capture must not add
    # symbols or guards to the shape env of the frame being compiled.
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = [mode.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor) else a
            for a in args]
    for f, a in zip(fake, args):
        if isinstance(a, torch.Tensor) and a.dim() == 0 and not a.is_complex():
            # specialized by value: Dynamo's dynamic=True hands module floats (BatchNorm's
            # eps and momentum, dropout's p) over as 0-d tensors and .item()s them; the
            # runtime keys the variant by the values of those it finds read (``scalars``)
            f.item_memo = a.item()
    if autocast is not None:
        with torch._guards.tracing(None), mode:
            spec["edges"] = _edge_dtypes(lifted, fake, freeze)
    with torch._guards.tracing(None), mode, (torch.no_grad() if freeze else torch.enable_grad()):
        gm = make_fx(torch.func.functionalize(flat, remove="mutations"), tracing_mode="real")(*fake)
    # lazy code generation: every pass ends in ``recompile()``, and generating ResNet-50's
    # code 17 times cost ~0.5 s of a compile (profiled) where only the last one is run;
    # run_pipeline generates it once at the end (torch.fx's own class, as Dynamo and
    # Inductor use it; a call or ``.code`` also generates it)
    gm = _LazyGraphModule.from_graphmodule(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    scalars = [i for i, n in enumerate(placeholders)
               if any(u.target is aten._local_scalar_dense.default for u in n.users)]
    for n, a in zip(placeholders, args):  # a scalar input (Dynamo's automatic-dynamic sizes)
        if "val" not in n.meta and isinstance(a, (int, float, bool)):
            n.meta["val"] = a
    state, state_attrs = {}, {}
    if freeze:
        writes = written(gm)
        state = {i: writes[placeholders[i]] for i in lifted.weights if placeholders[i] in writes}
        ptrs = {getattr(gm, n.target).data_ptr(): why for n, why in writes.items()
                if n.op == "get_attr"}
        state_attrs = {k: ptrs[t.data_ptr()] for k, t in lifted.attrs.items()
                       if t.data_ptr() in ptrs}
        for i, name in lifted.weights.items():
            if i not in state:
                _freeze(gm, placeholders[i], args[i], name, f"_fp_w{i}")
    user_idx = [i for i in range(len(args))
                if not (freeze and i in lifted.weights and i not in state)]
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target is aten.convolution.default:
            _swap(gm, n, fp.conv, (*n.args, None, [], []))
        elif freeze and n.op == "call_function" and n.target in _MATMUL:
            _canonical_matmul(gm, n)
        elif n.op == "call_function" and n.target in (aten.as_strided_.default,
                                                      aten.as_strided.default):
            _functional_restride(gm, n)
        elif (bn_args := batch_norm_as_native(n)) is not None:  # torch 2.8's spellings
            _swap(gm, n, aten.native_batch_norm.default, bn_args)
    _cpu_kernel_strides(gm)
    structured = _structured_output(gm, spec["out"])
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return Captured(gm, None if structured else spec["out"], user_idx, state, state_attrs,
                    [i for i in scalars if i in user_idx])


def _structured_output(gm, spec) -> bool:
    """Give the graph the original output structure when FX can spell it (tuple, list,
    dict); otherwise (dataclasses such as HF ModelOutput) the runtime unflattens."""
    def builtin(s):
        return s.type in (tuple, list, dict, None) and all(builtin(c) for c in treespec_children(s))
    if not builtin(spec):
        return False
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = (pytree.tree_unflatten(list(out.args[0]), spec),)
    return True


def _swap(gm, n, target, args):
    with gm.graph.inserting_before(n):
        c = gm.graph.call_function(target, tuple(args))
    c.meta.update(n.meta)
    n.replace_all_uses_with(c)
    gm.graph.erase_node(n)
    return c


_MATMUL = {aten.addmm.default, aten.mm.default}


def _canonical_matmul(gm, n):
    """``addmm(b, x, W)`` / ``mm(x, W)`` with a frozen 2-D ``W`` (GPT-2's Conv1D, hand
    written ``x @ W + b``) is a linear with weight ``W.t()``: one spelling for patterns."""
    if n.target is aten.addmm.default:
        b, x, w = n.args[:3]
        if n.kwargs.get("beta", 1) != 1 or n.kwargs.get("alpha", 1) != 1 or len(n.args) > 3:
            return
    else:
        (x, w), b = n.args[:2], None
    (w, cast), bsrc = _frozen(w), _frozen(b)[0]
    if w is None:
        return
    if b is not None and not (bsrc is not None and bsrc.meta["val"].dim() == 1):
        return
    from fusepass.ir import add_constant
    t = getattr(gm, w.target).t().contiguous()
    wt = add_constant(gm, t if cast is None else t.to(cast), "wt", n,
                      source=w.meta.get("fusepass_source"))
    _swap(gm, n, fp.linear, (x, wt, b, None, [], []))


def _frozen(n):
    """(the frozen constant ``n`` is, or that autocast's ``_to_copy(W, dtype=)`` casts;
    the cast dtype or None); (None, None) for anything else."""
    if isinstance(n, fx.Node) and n.op == "get_attr":
        return n, None
    if (isinstance(n, fx.Node) and n.target is aten._to_copy.default and len(n.args) == 1
            and set(n.kwargs) == {"dtype"} and isinstance(n.args[0], fx.Node)
            and n.args[0].op == "get_attr"):
        return n.args[0], n.kwargs["dtype"]
    return None, None


def _functional_restride(gm, n):
    """Decompositions (adaptive_avg_pool2d/3d to 1x1) restore a memory format with an
    in-place ``as_strided_`` that only changes the strides of size-1 dims. No element
    moves, but a convolution reads those strides to choose its layout: the functional
    ``as_strided`` view (same size, same strides) keeps them, in the functional IR.
    torch 2.8's trace already spells it as that view: only marked."""
    t, size, stride = n.args[:3]
    offset = n.args[3] if len(n.args) > 3 else None
    v = t.meta["val"]
    if offset not in (None, 0) or list(size) != list(v.shape) or len(t.users) != 1:
        return
    if all(a == b for a, b, k in zip(v.stride(), stride, size) if k != 1):
        c = n if n.target is aten.as_strided.default else _swap(
            gm, n, aten.as_strided.default, (t, list(size), list(stride)))
        if t.target is aten.mean.dim:  # ATen's adaptive pool to 1: channels-last if x is
            c.meta["fusepass_restride_of"] = t.args[0]


def _restride_strides(n):
    """The strides of a pool-to-1 restride (``_functional_restride``) as ATen's composite
    decides them on the CPU: channels-last when the pool's input suggests it, else the
    mean's own. The trace baked in the fake input's; ``_cpu_kernel_strides`` may have
    corrected that input's strides since."""
    from torch._prims_common import suggest_memory_format
    x, y = n.meta["fusepass_restride_of"].meta["val"], n.args[0].meta["val"]
    fmt = suggest_memory_format(x)
    if fmt in (torch.channels_last, torch.channels_last_3d):
        return list(torch.empty(y.shape, device="meta", memory_format=fmt).stride())
    return list(y.stride())


def _cpu_kernel_strides(gm):
    """The fake ``native_batch_norm`` and pointwise ops give a result that is contiguous
    and channels-last at once (a size-1 dim) other strides than the CPU kernel does
    (``ir.as_cpu_kernel_writes``), and the next conv reads those strides to choose its
    layout. Fix such results' meta and re-propagate what follows them, as far as the
    strides change (rare: only such ambiguous values)."""
    from fusepass.ir import as_cpu_kernel_writes, infer_meta
    changed = set()
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        old = n.meta.get("val")
        restride_of = n.meta.get("fusepass_restride_of")
        if restride_of is not None and restride_of in changed:
            n.args = (n.args[0], n.args[1], _restride_strides(n), *n.args[3:])
            infer_meta(gm, n)
        elif any(a in changed for a in n.all_input_nodes):
            infer_meta(gm, n)
        else:
            n.meta["val"] = as_cpu_kernel_writes(n, old)
        if not _same_values_layout(old, n.meta.get("val")):
            changed.add(n)


def _same_values_layout(a, b) -> bool:
    from torch.utils._pytree import tree_leaves
    la, lb = tree_leaves(a), tree_leaves(b)
    return len(la) == len(lb) and all(
        not isinstance(x, torch.Tensor) or (isinstance(y, torch.Tensor) and x.stride() == y.stride())
        for x, y in zip(la, lb))


def _freeze(gm, placeholder, tensor, name, attr):
    gm.register_buffer(attr, tensor.detach(), persistent=False)
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        g = gm.graph.get_attr(attr)
    g.meta["val"] = placeholder.meta["val"]
    g.meta["fusepass_source"] = name
    placeholder.replace_all_uses_with(g)
    gm.graph.erase_node(placeholder)
