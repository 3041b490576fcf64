"""May a kernel accumulate its result into ``other``'s buffer? Liveness and alias analysis.

oneDNN's sum post-op (``mkldnn._convolution_pointwise_.binary``) writes ``conv(x) + other``
into ``other`` and returns it: no output allocation, one stream fewer. The fused op is
functional, so lowering may pick the in-place kernel only when nobody can observe that
``other``'s buffer changed. An FX graph runs in node order, which makes liveness exact:

* ``other`` is produced inside this graph: not a placeholder (the caller's tensor) and
  not a ``get_attr`` (a constant every call reuses);
* nothing in ``other``'s alias class is a graph input, a constant or a graph output. The
  class is ``other`` plus everything it views or is viewed by, transitively, read off
  the op schemas (``aten.view(Tensor(a) self) -> Tensor(a)``, and the ``Tensor(a!)``
  result of an earlier in-place kernel); ops without a schema are assumed to alias
  their inputs;
* no member of the class is read after the fused op;
* the fused op reads no other alias of the buffer (``conv(x) + x`` must not write x while
  the convolution reads it);
* ``other`` has the result's layout (strides of every non-trivial dim), so the in-place
  result is laid out as the out-of-place one would be and is dense (no expanded view).

Backend-neutral: the kernel-specific conditions (which binary ops, which layouts take
the fused path) stay in the target module.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch.fx as fx


def _arg_nodes(a):
    if isinstance(a, fx.Node):
        return [a]
    if isinstance(a, (list, tuple)):
        return [n for x in a for n in _arg_nodes(x)]
    return []


def aliased_inputs(n: fx.Node) -> list:
    """Inputs whose storage ``n``'s result may share."""
    if n.op != "call_function":
        return []
    if n.target is operator.getitem:
        return _arg_nodes(n.args[0])
    schema = getattr(n.target, "_schema", None)
    if schema is None:
        return list(n.all_input_nodes)  # unknown op: assume the worst
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
