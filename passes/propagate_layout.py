"""Run convolution regions in channels-last (NHWC), converting only at region boundaries.

Why: oneDNN convolutions compute in NHWC (or blocked) layouts; fed NCHW they reorder
their input in and their output back on every call. A *region* — convolutions and the
layout-tolerant ops around them (``fusepass.layout_rules``: pointwise, BN, pooling,
resampling, padding, channel concat/split) — is converted once where activations enter
it and converted back only where a consumer needs eager's layout (views, permutes,
matmuls, unknown ops, graph outputs). Nothing is converted inside a region; a graph
without a convolution is left exactly as it is. The conversions are
``aten.clone(x, memory_format=channels_last | contiguous_format)``.

Regions are the connected components (networkx) of tolerant nodes that contain a conv.
A member whose moving out of the region strictly lowers the bytes converted (``x + y``
feeding a conv: convert the sum, not both operands; an upsample just before an exit)
is pruned first.

Cost rule, per region: rewrite iff ``converted < saved``, where
  * ``converted`` = bytes of the values converted at its boundaries (entries not
    already channels-last, exits whose consumer needs another layout), and
  * ``saved`` = sum over its convs of input + output activation bytes: the NCHW <-> NHWC
    reorders oneDNN does per conv when fed NCHW, which the region removes.
FLOPs are reported but do not decide: measured on torch 2.13 / 2 cores, the NHWC gain
of a conv tracks the activation bytes it stops reordering, not its FLOPs (a 512-ch 3x3
conv at 7x7, ~1000 FLOPs/byte, gains as little as a 1x1). A lone conv whose input and
output both cross the boundary therefore ties and is declined: converting costs what it
saves. A region that needs no conversion at all (input already channels-last) is kept.

Graph outputs keep eager's strides: their layout is checked after the rewrite, and an
output whose strides still changed is converted back once (reported). Everything is
decided before the graph is touched; nothing relies on the pipeline's undo.
"""
from __future__ import annotations

import networkx as nx
import torch
from torch.fx.passes.infra.pass_base import PassResult
from torch.utils._pytree import tree_leaves

from fusepass import ops as fp
from fusepass import layout_rules as L
from fusepass.ir import GETITEM, infer_meta

aten = torch.ops.aten


def _candidates(gm):
    """Tolerant nodes, minus what the region could not hand back as eager had it."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    cands = {n for n in gm.graph.nodes if L.rule_for(n) is not None}
    while True:
        drop = set()
        for n in cands:
            v = n.meta.get("val")
            if n.target is GETITEM and n.args[0] not in cands:
                drop.add(n)  # a getitem is a member only with its tuple
            elif isinstance(v, (tuple, list)) and any(u not in cands for u in n.users):
                drop.add(n)  # a tuple-valued op needs all its getitems inside
            elif out in n.users and isinstance(v, torch.Tensor) and v.dim() == 4 and not (
                    v.is_contiguous() or L.is_nhwc(v)):
                drop.add(n)  # a graph output eager gave non-dense strides (a channel slice)
        if not drop:
            return cands
        cands -= drop


def _components(nodes) -> list[set]:
    g = nx.Graph()
    g.add_nodes_from(nodes)
    g.add_edges_from((a, n) for n in nodes for a in n.all_input_nodes if a in nodes)
    return [c for c in nx.connected_components(g) if any(n.target in fp.CONV_OPS for n in c)]


def _plan(members) -> tuple[dict, dict]:
    """(entries, exits): value -> bytes converted, predicted from the original meta."""
    entries, exits = {}, {}
    for n in members:
        for a in L.activation_inputs(n):
            if a not in members and not L.is_nhwc(a.meta["val"]):
                entries[a] = L.nbytes(a.meta["val"])
        v = n.meta["val"]
        outside = [u for u in n.users if u not in members]
        if outside and isinstance(v, torch.Tensor) and v.dim() == 4:
            pred = L.cl_strides(v.shape)
            if any(pred != v.stride() if u.op == "output"
                   else not L.satisfies(v.shape, pred, L.format_of(v)) for u in outside):
                exits[n] = L.nbytes(v)
    return entries, exits


def _cost(members):
    entries, exits = _plan(members)
    return sum(entries.values()) + sum(exits.values()), len(entries) + len(exits)


def _prune(region: set) -> set:
    """Move boundary ops out of the region while that strictly lowers the conversions."""
    changed = True
    while changed:
        changed = False
        for n in sorted(region, key=lambda n: n.name):
            if n.target in fp.CONV_OPS or n.target is GETITEM or not isinstance(n.meta["val"], torch.Tensor):
                continue
            if all(a in region for a in L.activation_inputs(n)) and all(u in region for u in n.users):
                continue  # interior
            if _cost(region - {n}) < _cost(region):
                region, changed = region - {n}, True
    return region


def _decide(region, report) -> bool:
    entries, exits = _plan(region)
    convs = [n for n in region if n.target in fp.CONV_OPS]
    flops = sum(L.conv_flops(c) for c in convs)
    saved = sum(L.nbytes(c.args[0].meta["val"]) + L.nbytes(c.meta["val"])
                for c in convs if not L.is_nhwc(c.args[0].meta["val"]))
    converted = sum(entries.values()) + sum(exits.values())
    inputs = sorted({a.name for n in region for a in L.activation_inputs(n) if a not in region})
    ok = converted == 0 or converted < saved
    report.record("propagate_layout", "region", ",".join(inputs) or min(n.name for n in convs),
                  "rewritten" if ok else "declined",
                  f"{flops:,} conv FLOPs in {len(convs)} conv(s), {len(region)} ops; "
                  f"{converted:,} B converted at {len(entries)} entries + {len(exits)} exits vs "
                  f"{saved:,} B of per-conv NCHW reorders saved (rule: converted < saved)")
    return ok


def _clone(gm, x, fmt, kind, where):
    with where:
        c = gm.graph.create_node("call_function", aten.clone.default, (x,), {"memory_format": fmt},
                                 name=f"{x.name}_{kind[3:]}")
    c.meta["fusepass_layout"] = kind
    infer_meta(gm, c)
    return c


def _rewrite(gm, members, orig):
    g = gm.graph
    made = {}
    for v in list(g.nodes):  # entries, then each member's meta in graph order
        if v not in members:
            continue
        for a in L.activation_inputs(v):
            if a not in members and not L.is_nhwc(a.meta["val"]):
                if a not in made:
                    made[a] = _clone(gm, a, L.CL, "to_nhwc", g.inserting_before(v))
                v.replace_input_with(a, made[a])
        infer_meta(gm, v)
    for v in [n for n in g.nodes if n in members]:  # exits, from the propagated meta
        cur, was = v.meta["val"], orig[v]
        outside = [u for u in v.users if u not in members]
        if not outside or not isinstance(cur, torch.Tensor) or cur.dim() != 4:
            continue
        fmt = L.format_of(was)
        if any(cur.stride() != was.stride() if u.op == "output"
               else not cur.is_contiguous(memory_format=fmt) for u in outside):
            back = _clone(gm, v, fmt, "to_nchw" if fmt is not L.CL else "to_nhwc", g.inserting_after(v))
            for u in outside:
                u.replace_input_with(v, back)
            made[v] = back
    changed = set(members) | set(made.values())
    for n in g.nodes:  # consumers downstream of the region see the restored layout
        if n.op == "call_function" and n not in changed and any(a in changed for a in n.all_input_nodes):
            infer_meta(gm, n)
            changed.add(n)
    return made


def _keep_output_strides(gm, out, want, report):
    """Graph outputs keep eager's strides: the plan converts every region value that is
    an output; an output downstream of a region whose layout still changed gets one
    conversion back to eager's format (reported). No strides to restore by a format
    (none that a dense clone gives) was filtered out by ``_candidates``."""
    leaves = [n for n in tree_leaves(out.args) if hasattr(n, "meta")]
    for n, w in zip(leaves, want):
        h = n.meta["val"]
        if not isinstance(w, torch.Tensor) or all(
                a == b for a, b, d in zip(w.stride(), h.stride(), w.shape) if d > 1):
            continue  # the same memory layout (size-1 dims' strides aside)
        back = _clone(gm, n, L.format_of(w), "to_nchw", gm.graph.inserting_after(n))
        out.replace_input_with(n, back)
        report.record("propagate_layout", "exit", n.name, "info",
                      f"output {n.name} converted back to eager's strides {tuple(w.stride())}")


def propagate_layout(gm, *, options, report) -> PassResult:
    cands = _candidates(gm)
    regions = [r for c in _components(cands) for r in _components(_prune(c))]
    if not regions:
        return PassResult(gm, False)  # no convolution: the graph stays as it was
    members = set().union(*[r for r in regions if _decide(r, report)])
    if not members:
        return PassResult(gm, False)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    orig = {n: n.meta.get("val") for n in gm.graph.nodes}
    want = [orig[n] for n in tree_leaves(out.args) if hasattr(n, "meta")]
    made = _rewrite(gm, members, orig)
    _keep_output_strides(gm, out, want, report)
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, bool(made))
