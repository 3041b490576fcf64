"""Reorder the weights of lowered oneDNN convs/linears once, at compile time.

Why: fed a plain (OIHW / [out, in]) weight, ``mkldnn._convolution_pointwise`` and
``_linear_pointwise`` reorder it into oneDNN's blocked format on *every call* — for
ResNet-50 that is ~100 MB of weight traffic per inference. Here each constant weight is
reordered once (``mkldnn._reorder_convolution_weight`` / ``_reorder_linear_weight``) into
an opaque MKLDNN tensor the kernels take as is. Runs on the lowered graph: the blocked
format only means something to the oneDNN kernels (other targets have no such nodes).

Facts this relies on (torch 2.13, measured): a weight packed for one input size serves
any batch and spatial size, in either layout, with identical results — so a graph
optimized at batch 1 stays correct at batch 8 without repacking (the runtime also keys
variants by input shape). But with a packed weight the out-of-place conv kernels return
channels-last output even for an NCHW input; packing such a conv would change the layout
downstream (a ``view`` could fail, an output's strides differ from eager's), so convs
whose output is not already channels-last (``propagate_layout`` declined or disabled)
keep their dense weight (layout is decided in one place, ``propagate_layout``). The test
is exact, size-1 dims included: an output that is channels-last only by ambiguity (C == 1,
or [N,C,1,1] laid out contiguous) would come back with other strides, and the next conv
reads them to choose its layout.

Weights are deduplicated: one packed tensor per (weight, conv parameters), shared by
every node using it. ``meta["val"]`` of a packed constant is the dense weight's fake
value (opaque tensors have no strides a FakeTensor could mirror). The report records
each weight and the bytes the packed copies add.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from fusepass.ir import (add_constant, constant, delete_unused_attrs, is_constant, run_on_values, val,
                         value_mode)
from fusepass.layout_rules import cl_strides

mkldnn = torch.ops.mkldnn
# kernel -> (kind, position of x, of the weight, of padding/stride/dilation/groups or None)
KERNELS = {
    mkldnn._convolution_pointwise.default: ("conv", 0, 1, 3),
    mkldnn._convolution_pointwise.binary: ("conv", 0, 2, 4),
    mkldnn._convolution_pointwise_.binary: ("conv", 1, 2, 4),
    mkldnn._linear_pointwise.default: ("linear", 0, 1, None),
    mkldnn._linear_pointwise.binary: ("linear", 0, 2, None),
}


def _why_not(gm, node, kind, x, w):
    if not is_constant(gm, w):
        return "weight is not a frozen constant"
    t = constant(gm, w)
    if t.layout != torch.strided or t.dtype not in (torch.float32, torch.bfloat16):
        return f"weight is {t.layout}/{t.dtype}"
    if kind == "conv":
        y = val(node)
        if t.dim() != 4:
            return f"{t.dim() - 2}-d convolution: only 2-d conv weights are packed"
        if y is None or tuple(y.stride()) != cl_strides(y.shape):
            return _ambiguous_reason(gm, node, y)
    return None


def _restrided(gm, node, y):
    """The value of ``node`` with the packed kernel's (channels-last) strides."""
    with value_mode(gm):
        return torch.empty_strided(y.shape, cl_strides(y.shape), dtype=y.dtype)


def _ambiguous_reason(gm, node, y):
    """A packed conv returns channels-last. Where the output already is channels-last in
    memory but not in its strides (size-1 dims: [N,C,1,1] squeeze-excite convs, C == 1),
    packing is taken only when nobody can tell (``_unseen``), decided before anything
    changes."""
    reason = (f"NCHW conv (output strides {None if y is None else tuple(y.stride())}): with "
              "a packed weight oneDNN returns channels-last, which would change the layout "
              "eager gives downstream (propagate_layout decides layout)")
    if y is None or value_mode(gm) is None or not _same_memory(y.stride(), cl_strides(y.shape), y.shape):
        return reason
    why = _unseen(gm, node, _restrided(gm, node, y))
    return None if why is None else f"{reason} ({why})"


def _same_memory(a, b, shape) -> bool:
    return all(x == z for x, z, d in zip(a, b, shape) if d > 1)


def _unseen(gm, node, new, depth=0):
    """None when ``node`` taking the value ``new`` changes no user's result strides: an ATen
    user is re-run on the graph's values; a stock oneDNN conv user (which reads its input's strides
    to choose its layout) is followed when its own result stays the same memory; anything
    else (a graph output, another kernel) can tell."""
    for u in node.users:
        if u.op != "call_function" or depth > 4:
            return f"{u.name} reads the strides"
        if u.target in KERNELS and KERNELS[u.target][0] == "conv" and u.args[KERNELS[u.target][1]] is node:
            v = u.meta["val"]
            out = _restrided(gm, u, v) if v.dim() == 4 else None
            if out is None or not _same_memory(out.stride(), v.stride(), v.shape):
                return f"{u.name} would change layout"
            if tuple(out.stride()) != tuple(v.stride()) and (why := _unseen(gm, u, out, depth + 1)):
                return why
            continue
        if getattr(u.target, "namespace", None) != "aten":
            return f"{u.name} reads the strides"
        args = fx.node.map_arg(u.args, lambda a: new if a is node else a.meta["val"])
        kwargs = fx.node.map_arg(u.kwargs, lambda a: new if a is node else a.meta["val"])
        out = run_on_values(value_mode(gm), u.target, args, kwargs)
        if not isinstance(out, torch.Tensor) or out.stride() != u.meta["val"].stride():
            return f"{u.name}'s result would change layout"
    return None


def _pack(gm, node, kind, x, w, p):
    t = constant(gm, w)
    if kind == "linear":
        return mkldnn._reorder_linear_weight(t, val(x).shape[:-1].numel())
    pad, stride, dil, groups = (node.args[p + i] for i in range(4))
    return mkldnn._reorder_convolution_weight(t, pad, stride, dil, groups, list(val(x).shape))


def prepack_weights(gm, *, options, report) -> PassResult:
    packed = {}  # dedup key -> get_attr node of the packed weight
    users = {}  # dedup key -> number of nodes sharing it
    added = dense = 0
    for node in list(gm.graph.nodes):
        spec = KERNELS.get(node.target) if node.op == "call_function" else None
        if spec is None:
            continue
        kind, xi, wi, p = spec
        x, w = node.args[xi], node.args[wi]
        reason = _why_not(gm, node, kind, x, w)
        if reason:
            report.record("prepack_weights", f"prepack.{kind}", node.name, "declined", reason)
            continue
        t = constant(gm, w)
        params = tuple(tuple(a) if isinstance(a, list) else a for a in node.args[p:p + 4]) if p else ()
        key = (kind, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, params)
        if key not in packed:
            blob = _pack(gm, node, kind, x, w, p)
            packed[key] = add_constant(gm, blob, f"packed_{kind}", before=node,
                                       source=w.meta.get("fusepass_source"))
            packed[key].meta["val"] = w.meta["val"]  # the dense weight's fake value
            added += mkldnn._nbytes(blob)
            dense += t.numel() * t.element_size()
        users[key] = users.get(key, 0) + 1
        node.update_arg(wi, packed[key])
        y = val(node)
        if kind == "conv" and tuple(y.stride()) != cl_strides(y.shape):
            node.meta["val"] = _restrided(gm, node, y)  # _ambiguous_reason: nobody can tell
        shared = f", shared with {users[key] - 1} earlier node(s)" if users[key] > 1 else ""
        report.record("prepack_weights", f"prepack.{kind}", node.name, "rewritten",
                      f"{w.name} -> {packed[key].target}{shared}")
    if not packed:
        return PassResult(gm, False)
    for n in [n for n in gm.graph.nodes if n.op == "get_attr" and not n.users]:
        gm.graph.erase_node(n)  # dense weights no kernel reads any more
    delete_unused_attrs(gm)
    report.record("prepack_weights", "-", "-", "info",
                  f"packed {len(packed)} weight(s) for {sum(users.values())} node(s): "
                  f"+{added:,} B of oneDNN blocked weights ({dense:,} B dense)")
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, True)
