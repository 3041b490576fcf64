"""Named, pure guards of the binary rows (``patterns/binary.py``): conv/linear (+) other.

A binary post-op is legal when ``other`` is a tensor of exactly the conv/linear output's
shape and dtype (oneDNN's binary/sum post-op does not broadcast, and a per-channel or
scalar operand is fold_binary_constants' business: it folds into the weights/bias), the
chain so far is empty (the kernels apply the binary post-op first, then at most one
eltwise), ``alpha`` is 1 (no kernel scales an operand), and fusing creates no cycle.

The cycle guard is the only one reading graph structure. FX graphs are kept in
topological order (``graph.lint()`` checks it), so a path conv -> ... -> other can only
run through the nodes between the two: when ``other`` comes before the conv (the usual
residual: the identity is computed before the branch) there is nothing to walk, and
otherwise networkx searches only that window. No whole-graph networkx copy is built per
candidate, and the window cannot go stale between rewrites.
"""
from __future__ import annotations

import networkx as nx
import torch.fx as fx

from fusepass import ops as fp


def empty_chain(m):
    """The conv/linear carries no post-op yet: the binary post-op must come first."""
    post = list(m["post"])
    if any(fp.POST_OPS[p].binary for p in post if p in fp.POST_OPS):
        return f"chain {post} already has a binary post-op: the kernels take one"
    if post:
        return f"chain {post} already has eltwise post-ops: the kernels apply the binary op first"
    if m["prev_other"] is not None:
        return "the op already has a binary operand"
    return None


def other_is_tensor(m):
    o = m["other"]
    if not isinstance(o, fx.Node):
        return f"other is the scalar {o!r}: fold it into the bias instead (fold_binary_constants)"
    if m.val("other") is None:
        return "other has no meta['val']"
    return None


def alpha_is_one(m):
    a = m.bindings.get("alpha", 1)
    if isinstance(a, fx.Node) or a != 1:
        return f"alpha={a}: no kernel takes a scaled operand"
    return None


def same_shape(m):
    """other has the conv/linear output's shape: a sum, not a broadcast."""
    o, y = m.val("other"), m.fused.meta.get("val")
    if y is None:
        return "conv/linear output has no meta['val']"
    if tuple(o.shape) == tuple(y.shape):
        return None
    shapes = f"other {list(o.shape)}, output {list(y.shape)}"
    if o.numel() > y.numel():
        return f"the output broadcasts to other's shape ({shapes}): not a sum"
    if getattr(m["other"], "op", None) == "get_attr":
        return f"other is a constant that broadcasts ({shapes}): fold it into the op instead"
    return f"other broadcasts ({shapes}): not a sum"


def same_dtype(m):
    o, y = m.val("other"), m.fused.meta.get("val")
    if o.dtype != y.dtype:
        return f"dtype promotion: other is {o.dtype}, output {y.dtype}"
    if o.device != y.device:
        return f"other is on {o.device}, output on {y.device}"
    return None


def no_cycle(m):
    """other must not depend on the conv/linear output (the fused op would need itself)."""
    src, other = m.fused, m["other"]
    if other is src:
        return "other is the conv/linear output itself (y + y): nothing to fuse"
    if other < src:  # topological order: no path from src to an earlier node
        return None
    window = nx.DiGraph()
    n = src
    while n is not other:
        for u in n.users:
            if u is not m.anchor:  # the anchor consumes other: never on a path to it
                window.add_edge(n, u)
        n = n.next
    if window.has_node(src) and window.has_node(other) and nx.has_path(window, src, other):
        return f"other depends on {src.name}'s output: fusing would create a cycle"
    return None


def eager_layout(m):
    """The fused op's result is laid out as the conv/linear output; eager lays ``y (+) other``
    out after its operands (``other + conv(x)`` after ``other``): where the two differ,
    fusing would hand back other strides than eager gives."""
    y, out = m.fused.meta.get("val"), m.anchor.meta.get("val")
    if y is None or out is None:
        return None
    if all(a == b for a, b, d in zip(y.stride(), out.stride(), y.shape) if d > 1):
        return None
    return (f"eager lays the result out as {tuple(out.stride())} (after other), the fused op "
            f"would give the output's {tuple(y.stride())}")
