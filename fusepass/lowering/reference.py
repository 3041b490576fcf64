"""The reference target: every fusepass op expanded into the plain ATen it stands for.

The oracle for tests, and what ``lowering="reference"`` produces.
"""
from __future__ import annotations

import torch.fx as fx

from fusepass import ops as fp
from fusepass.ir import infer_meta


def expand(gm, node):
    tracer = fx.proxy.GraphAppendingTracer(gm.graph)
    args = [fx.Proxy(a, tracer) if isinstance(a, fx.Node) else a for a in node.args]
    before = set(gm.graph.nodes)
    with gm.graph.inserting_before(node):
        out = fp.REFERENCE[node.target](*args).node
    for n in gm.graph.nodes:
        if n not in before:
            infer_meta(gm, n)
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    return out


def apply_tail(gm, node, head, other, post, scalars):
    """The post-ops ``post`` (with their scalars) applied as ATen to ``head``'s result,
    inserted before ``node``; returns the last node."""
    tracer = fx.proxy.GraphAppendingTracer(gm.graph)
    o = fx.Proxy(other, tracer) if isinstance(other, fx.Node) else other
    before = set(gm.graph.nodes)
    with gm.graph.inserting_before(node):
        out = fp.apply_chain(fx.Proxy(head, tracer), o, post, scalars).node
    for n in gm.graph.nodes:
        if n not in before:
            infer_meta(gm, n)
    return out
