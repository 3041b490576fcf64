"""May a kernel accumulate its result into ``other``'s buffer? Liveness and alias analysis.

oneDNN's sum post-op (``mkldnn._convolution_pointwise_.binary``) writes ``conv(x) + other``
into ``other`` and returns it: no output allocation, one stream fewer. The fused op is
functional, so lowering may pick the in-place kernel only when nobody can observe that
``other``'s buffer changed. An FX graph runs in node order, which makes liveness exact:

* ``other`` is produced inside this graph: not a placeholder (the caller's tensor) and
  not a ``get_attr`` (a constant every call reuses);
* nothing in ``other``'s alias class is a graph input, a constant or a graph output. The
  class is ``other`` plus everything it views or is viewed by, transitively
  (``aliased_inputs`` says which inputs a result may share storage with);
* no member of the class is read after the fused op;
* the fused op reads no other alias of the buffer (``conv(x) + x`` must not write x while
  the convolution reads it);
* ``other`` has the result's layout (strides of every non-trivial dim), so the in-place
  result is laid out as the out-of-place one would be and is dense (no expanded view).

Backend-neutral: the kernel-specific conditions (which binary ops, which layouts take
the fused path) stay in the target module.
"""
from __future__ import annotations

import functools
import operator
from typing import Optional

import torch
import torch.fx as fx

aten = torch.ops.aten

# aten ops whose result shares storage with an input although no return is annotated.
# Found by running OpInfo's CPU float32 samples (and ResNet-18, MobileNetV3, EfficientNet,
# BERT through fusepass) under a dispatch mode comparing each result's storage with its
# inputs' on torch 2.13: only _unsafe_view and unsafe_split, of 480 overloads reached;
# unsafe_split_with_sizes is unsafe_split's sibling, lift returns its input (native code).
UNDECLARED_ALIASES = {aten._unsafe_view.default, aten.unsafe_split.Tensor,
                      aten.unsafe_split_with_sizes.default, aten.lift.default}


@functools.lru_cache(maxsize=None)
def _composite_implicit(op) -> bool:
    """A CompositeImplicitAutograd kernel is a decomposition, free to return an input as
    it is (``dropout(train=False)``, ``type_as`` to the same dtype, ``to_dense`` of a
    dense tensor): its schema cannot say so, and torch's ``maybe_aliasing_or_mutating``
    tag marks only some of them."""
    name = getattr(op, "name", None)
    if not callable(name):
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(name(), "CompositeImplicitAutograd")
    except RuntimeError:  # not a dispatcher op (IPEX's TorchScript-only ipex_prepack::*)
        return False


def _arg_nodes(a):
    if isinstance(a, fx.Node):
        return [a]
    if isinstance(a, (list, tuple)):
        return [n for x in a for n in _arg_nodes(x)]
    return []


def aliased_inputs(n: fx.Node) -> list:
    """Inputs whose storage ``n``'s result may share.

    The rule: a result may share storage with every input unless the op is *known* to
    declare its aliasing in its schema. Known means: it has a schema, it is not a
    composite-implicit op (``_composite_implicit``) and not one of the aten ops that
    share storage undeclared (``UNDECLARED_ALIASES``). Then the schema is taken at its
    word: a return annotated ``Tensor(a)`` / ``Tensor(a!)`` aliases the arguments of the
    same set (``aten.view(Tensor(a) self) -> Tensor(a)``, an earlier in-place kernel's
    result), an unannotated return is a new tensor. Other namespaces are taken at their
    schema's word too: the mkldnn ops optimized graphs run passed the audit above
    (IPEX's were not audited); ``fusepass::`` ops compute new tensors by construction.
    An op without a schema (a Python function) aliases every input."""
    if n.op != "call_function":
        return []
    if n.target is operator.getitem:
        return _arg_nodes(n.args[0])
    schema = getattr(n.target, "_schema", None)
    if schema is None or n.target in UNDECLARED_ALIASES or _composite_implicit(n.target):
        return list(n.all_input_nodes)  # unknown, or known to alias undeclared
    infos = [r.alias_info for r in schema.returns if r.alias_info is not None]
    if not infos:
        return []
    # a list return (split: ``Tensor(a)[]``) shows an empty set here: its elements' alias
    # sets are not exposed to Python, so it may alias any argument that has one
    out_sets = set().union(*(set(i.before_set) for i in infos))
    found = []
    for i, a in enumerate(schema.arguments):
        arg = n.args[i] if i < len(n.args) else n.kwargs.get(a.name)
        if a.alias_info is not None and (not out_sets or set(a.alias_info.before_set) & out_sets):
            found += _arg_nodes(arg)
    return found


def alias_class(node: fx.Node) -> list:
    """``node`` and every node whose result may share its storage (in discovery order)."""
    seen, todo = {node: None}, [node]
    while todo:
        n = todo.pop()
        near = aliased_inputs(n) + [u for u in n.users if n in aliased_inputs(u)]
        for m in near:
            if m not in seen:
                seen[m] = None
                todo.append(m)
    return list(seen)


def _same_layout(a, b) -> bool:
    if tuple(a.shape) != tuple(b.shape):
        return False
    return all(sa == sb for sa, sb, d in zip(a.stride(), b.stride(), a.shape) if d > 1)


def why_not_inplace(node: fx.Node, other, reads=()) -> Optional[str]:
    """None when ``node`` may write its result into ``other``; else the reason.
    ``reads``: the op's other operands (input, weight, bias), which must not alias it."""
    if not isinstance(other, fx.Node):
        return "other is not a tensor of this graph"
    if other.op == "placeholder":
        return "other is a graph input"
    if other.op == "get_attr":
        return "other is a constant"
    cls = alias_class(other)
    alias = lambda m: "other" if m is other else f"other aliases {m.name}, which"  # noqa: E731
    for m in cls:
        if m.op == "placeholder":
            return f"{alias(m)} is a graph input"
        if m.op == "get_attr":
            return f"{alias(m)} is a constant"
        for u in m.users:
            if u.op == "output":
                return f"{alias(m)} is a graph output"
            if u is not node and u > node:
                return f"{alias(m)} is read again after the op (by {u.name})"
    members = set(cls)
    for a in reads:
        if a is other:
            return "other is also an operand the op reads"
        if isinstance(a, fx.Node) and a in members:
            return f"other aliases {a.name}, which the op reads"
    o, y = other.meta.get("val"), node.meta.get("val")
    if o is None or y is None:
        return "no meta['val'] to compare layouts"
    if not _same_layout(o, y):
        return f"other's strides {tuple(o.stride())} differ from the result's {tuple(y.stride())}"
    return None
