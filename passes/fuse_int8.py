"""Fuse the quantization ops of a PT2E-quantized graph into int8 conv/linear ops.

Runs after ``fuse`` (the float rows have fused each conv/linear with its post-ops, the
dequantized tensors standing in for floats) and before ``propagate_layout``. In order:

  1. quantize ops of constants (``convert_pt2e(fold_quantize=False)`` keeps the float
     weight and quantizes it in the graph) are evaluated once into int8 constants;
  2. a ``dequantize_per_tensor`` (either overload) with several users is duplicated per user, as
     Inductor's "dequant promotion" does: each consumer can then take the int8 tensor;
  3. the ``int8.*`` rows of the pattern table (``patterns/quantized.py``), asking the
     chosen target's lowering table before each rewrite (``lowerable``), as ``fuse`` does;
  4. a conv/linear the rows declined keeps running in float on the dequantized input:
     its weight's dequantize is evaluated once here into a float constant, so nothing
     dequantizes a weight per call (the decline and its reason are in the report).

First of all, every quantization scale that is a number or a constant is checked: a
scale of 0, a negative or a non-finite one is a ``GraphError`` naming the node (eager
runs such a graph and divides by zero; no optimization should serve that).
A graph without quantized_decomposed ops is left untouched.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from fusepass import lowering
from fusepass import ops as fp
from fusepass.errors import GraphError
from fusepass.ir import add_constant, delete_unused_attrs, erase_dead
from fusepass.lowering.table import Form
from fusepass.patterns import TABLE
from fusepass.rewrite import apply_rules


def _qd_ops():
    qd = fp.quantized_decomposed()
    quant = {qd.quantize_per_tensor.default, qd.quantize_per_channel.default}
    dequant = {qd.dequantize_per_tensor.default, qd.dequantize_per_channel.default}
    return qd, quant, dequant


def _val(a):
    return a.meta.get("val") if isinstance(a, fx.Node) else None


def asker(targets):
    """The lowering table's answer for the int8 op a row would make of ``m``."""
    def lowerable(m, post, scalars, other):
        b = m.bindings
        qop = fp.qconv if any(n.target in fp.CONV_OPS for n in m.nodes) else fp.qlinear
        if isinstance(b.get("xs"), fx.Node):  # a per-call scale: dynamic quantization
            qop = fp.qlinear_dynamic
        x, w = b.get("xq", b.get("x")), b.get("wq", b.get("weight"))
        conv = qop is fp.qconv
        form = Form(qop, _val(x), _val(w), _val(b.get("bias")), _val(other), tuple(post),
                    tuple(scalars), m.anchor.meta.get("val"),
                    bool(b["transposed"]) if conv else False, b["groups"] if conv else 1)
        return lowering.why_not(targets, form)
    return lowerable


def _constant_inputs(gm, n) -> bool:
    return bool(n.all_input_nodes) and all(a.op == "get_attr" for a in n.all_input_nodes)


def _evaluate(gm, n, hint, report, why):
    """Replace ``n`` (an op of constants) by its value, computed now."""
    args = fx.node.map_arg(n.args, lambda a: getattr(gm, a.target))
    kwargs = fx.node.map_arg(n.kwargs, lambda a: getattr(gm, a.target))
    with torch.no_grad():
        value = n.target(*args, **kwargs)
    names = sorted({a.meta.get("fusepass_source") or a.target for a in n.all_input_nodes})
    c = add_constant(gm, value.detach(), hint, before=n, source=f"{hint}({', '.join(names)})")
    n.replace_all_uses_with(c)
    report.record("fuse_int8", f"int8.{hint}", n.name, "rewritten", why)
    erase_dead(gm, [n])


def _quantized_operands(n):
    """(xq, wq, dynamic) when a float fused op reads dequantize(u8) (``.tensor``: per-call
    qparams, dynamic quantization) and dequantize(s8 weight)."""
    qd = fp.quantized_decomposed()
    if n.op != "call_function" or n.target not in (fp.conv, fp.linear):
        return None
    x, w = n.args[0], n.args[1]
    if not (isinstance(x, fx.Node)
            and x.target in (qd.dequantize_per_tensor.default, qd.dequantize_per_tensor.tensor)
            and isinstance(w, fx.Node) and w.target is qd.dequantize_per_channel.default):
        return None
    return x.args[0], w.args[0], x.target is qd.dequantize_per_tensor.tensor


def _int8_form(n, xq, wq, dynamic, cut):
    qop = fp.qconv if n.target is fp.conv else fp.qlinear_dynamic if dynamic else fp.qlinear
    f = Form.of_node(n)
    head, sc, o = lowering.chain_prefix(n, cut)
    return Form(qop, _val(xq), _val(wq), f.bias, _val(o), tuple(head), tuple(sc), f.out,
                f.transposed, f.groups)


def _split_chains(gm, targets, report) -> bool:
    """A float-fused chain the int8 kernels take only a prefix of (squeeze-excite's
    conv + hardsigmoid): keep the prefix on the op, so the int8 row can take it, and run
    the rest as ATen on its float output."""
    changed = False
    for n in list(gm.graph.nodes):
        ops = _quantized_operands(n)
        post = fp.chain_of(n)[1] if ops else []
        if not post or lowering.why_not(targets, _int8_form(n, *ops, len(post))) is None:
            continue
        cut = next((c for c in range(len(post) - 1, -1, -1)
                    if lowering.why_not(targets, _int8_form(n, *ops, c)) is None), None)
        if cut is None:
            continue
        why = lowering.why_not(targets, _int8_form(n, *ops, len(post)))
        name = n.name
        lowering.cut_chain(gm, n, cut, expand_empty=False)
        report.record("fuse_int8", "int8.split", name, "rewritten",
                      f"{why}: {'+'.join(post[cut:])} runs as ATen after the int8 kernel")
        changed = True
    return changed


def _qname(a):
    ns = getattr(getattr(a, "target", None), "namespace", None)
    return a.target.name().split("::")[-1] if ns == "quantized_decomposed" else None


def _unmatched(gm, report):
    """A float conv/linear reading quantization ops no int8 row matched (dynamic or
    per-token activations, per-tensor or int4 weights, fp8, ...) says so: it runs as the
    graph says, in float."""
    seen = {d.node for d in report.decisions if d.stage == "fuse_int8"}
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in (fp.conv, fp.linear) or n.name in seen:
            continue
        x, w = _qname(n.args[0]), _qname(n.args[1])
        if x or w:
            report.record("fuse_int8", "int8.q" + fp.family_of(n.target), n.name, "declined",
                          f"input {x or 'float'}, weight {w or 'float'}: no int8 row takes it "
                          "(rows: static per-tensor u8 activations, per-channel s8 weights); "
                          "runs in float")


def _check_scales(gm, ops):
    """A quantize/dequantize whose scale (argument 1) is known now must have a positive
    finite one: raise ``GraphError`` otherwise."""
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in ops or len(n.args) < 2:
            continue
        s = n.args[1]
        if isinstance(s, fx.Node):
            if s.op != "get_attr":
                continue  # computed at run time (dynamic quantization): the kernel's business
            s = getattr(gm, s.target)
        values = torch.as_tensor(s, dtype=torch.float64)
        bad = values[~(torch.isfinite(values) & (values > 0))]
        if bad.numel():
            raise GraphError(f"{n.name} ({n.target.name()}) has scale {bad.flatten()[0].item()!r}: "
                             "a quantization scale must be a positive finite number (the "
                             "graph would divide by zero or compute NaN)")


def fuse_int8(gm, *, options, report) -> PassResult:
    qd, quant, dequant = _qd_ops()
    if not any(n.op == "call_function" and n.target in quant | dequant for n in gm.graph.nodes):
        return PassResult(gm, False)
    _check_scales(gm, quant | dequant | {qd.quantize_per_tensor.tensor,
                                         qd.dequantize_per_tensor.tensor})
    changed = False
    for n in list(gm.graph.nodes):  # 1. quantized weights, once
        if n.op == "call_function" and n.target in quant and _constant_inputs(gm, n):
            _evaluate(gm, n, "quantized_weight", report, "a constant quantized at compile time")
            changed = True
    for n in list(gm.graph.nodes):  # 2. dequant promotion
        if (n.op == "call_function" and len(n.users) > 1 and n.target in
                (qd.dequantize_per_tensor.default, qd.dequantize_per_tensor.tensor)):
            for u in list(n.users)[1:]:
                with gm.graph.inserting_before(u):
                    c = gm.graph.call_function(n.target, n.args, dict(n.kwargs))
                c.meta.update(n.meta)
                u.replace_input_with(n, c)
            changed = True
    rules = [r for r in TABLE.select("int8.") if options.enabled(r.name)]
    targets = lowering.targets_of(options.lowering, available=True)
    if rules and targets != ["reference"]:
        changed |= _split_chains(gm, targets, report)
    changed |= apply_rules(gm, rules, report, stage="fuse_int8", max_rounds=options.fuse_rounds,
                           lowerable=asker(targets))
    _unmatched(gm, report)
    for n in list(gm.graph.nodes):  # 4. what stays float dequantizes its weight once
        if n.op == "call_function" and n.target in dequant and _constant_inputs(gm, n):
            _evaluate(gm, n, "dequantized_weight", report,
                      "a weight left in float (its int8 row declined) dequantized at compile time")
            changed = True
    if changed:
        delete_unused_attrs(gm)
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, changed)
