"""Lowering: fused ops -> kernels of a target, through the lowering table
(``fusepass/lowering/table.py``; the targets' rows are registered by ``onednn.py`` and
``ipex.py``).

For each fused op, the targets of the chosen lowering are asked in order (ipex, then
onednn, for ``lowering="ipex"``); the first whose table entry takes the op builds the
kernel. The fuse pass asked the same table before it fused, so every fused op has a
kernel — except when a layout decided after fusion rules one out. Then the chain is
split: the kernel takes the longest prefix it can, the rest runs as ATen after it
(recorded as "kept", the one slowdown a test should never see unannounced). An op whose
bare conv/linear has no kernel (a transposed conv on onednn, bf16 on a CPU without
native bf16) becomes the plain ATen it stands for, with the reason ("declined").
``reference`` expands every fusepass op into plain ATen.
"""
from __future__ import annotations

import importlib.util

from fusepass import ops as fp
from fusepass.check import record_fused
from fusepass.lowering import ipex, onednn, onednn_int8, qdq, reference  # noqa: F401  (register their rows)
from fusepass.lowering.table import Form, entry

def ipex_available() -> bool:
    return importlib.util.find_spec("intel_extension_for_pytorch") is not None


def targets_of(lowering: str, available: bool = False) -> list[str]:
    """The targets asked in order, without importing anything; ``available``: without
    ipex when IPEX cannot be found (what the fuse pass's lowerable guard consults, so it
    fuses only what ``resolve``'s targets will lower)."""
    if lowering == "auto":
        lowering = "ipex" if ipex_available() else "onednn"
    if lowering == "ipex":
        return ["ipex", "onednn"] if not available or ipex_available() else ["onednn"]
    return [lowering]


def resolve(lowering: str, report) -> list[str]:
    """``targets_of``, with IPEX imported (or, when that fails, dropped and said so)."""
    targets = targets_of(lowering)
    if lowering == "auto":
        report.record("lower", "-", "-", "info", f"lowering='auto' chose {targets[0]!r}")
    if targets[0] == "ipex":
        try:
            ipex.load()
        except Exception as e:  # absent or broken IPEX: the onednn target, said so
            report.record("lower", "-", "-", "fallback", f"ipex target unavailable ({e}); using onednn")
            targets = ["onednn"]
    return targets


def why_not(targets, form: Form, late: bool = False):
    """None when one of ``targets`` has a kernel for ``form``, else the reasons."""
    if targets == ["reference"]:
        return None
    reasons = []
    for t in targets:
        e, reason = entry(t, form, late)
        if e is not None:
            return None
        reasons.append(reason if len(targets) == 1 else f"{t}: {reason}")
    return "; ".join(reasons)


def lower(gm, options, report):
    targets = resolve(options.lowering, report)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in fp.FUSED_OPS:
            continue
        if targets == ["reference"]:
            name, text = node.name, _chain_text(node)
            out = reference.expand(gm, node)
            report.record("lower", "aten." + out.target.__name__.split(".")[0], name, "lowered", text)
            continue
        try:
            _lower_one(gm, node, targets, options, report)
        except Exception as e:
            report.record("lower", "-", node.name, "error", f"{type(e).__name__}: {e}")
    qdq.expand(gm, report)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


def _lower_one(gm, node, targets, options, report):
    name, text = node.name, _chain_text(node)
    fused = record_fused(gm, node) if options.check else None
    form = Form.of_node(node)
    declined = []
    for t in targets:
        e, reason = entry(t, form, late=True)
        out = reason if e is None else e.build(gm, node)
        if isinstance(out, str):  # a builder may decline too, before it mutates
            declined.append(out if len(targets) == 1 else f"{t}: {out}")
            continue
        kernel, new = out
        note = new.meta.get("fusepass_lowering_note")
        if fused is not None:
            new.meta["fusepass_fused"] = fused
        via = f"{'; '.join(declined)}; {t} instead" if declined else ""
        report.record("lower", kernel, name, "lowered", "; ".join(filter(None, [text, via, note])))
        return
    why = "; ".join(declined)
    _, post, _ = fp.chain_of(node)
    if not post:
        reference.expand(gm, node)
        report.record("lower", "-", name, "declined", f"no kernel ({why}): runs as plain ATen")
        return
    head, tail = _split(gm, node, targets)
    report.record("lower", "-", name, "kept",
                  f"{text}: {why}; {'+'.join(tail)} run(s) as ATen after the kernel")
    if head is not None:
        _lower_one(gm, head, targets, options, report)


def _split(gm, node, targets):
    """Cut ``node``'s chain after its longest prefix some target takes (possibly none):
    the head stays a fused op (returned; None when nothing is left of the chain and the
    op is expanded to ATen), the tail becomes ATen ops on its result."""
    form = Form.of_node(node)
    cut = len(fp.chain_of(node)[1]) - 1
    while cut >= 0:  # down to the bare op: it may still have a kernel
        head, sc, o = chain_prefix(node, cut)
        f = Form(form.op, form.x, form.weight, form.bias, form.other if o is not None else None,
                 tuple(head), tuple(sc), form.out, form.transposed, form.groups)
        if why_not(targets, f, late=True) is None:
            return cut_chain(gm, node, cut, expand_empty=False)
        cut -= 1
    return cut_chain(gm, node, 0)  # not even the bare op: plain ATen


def chain_prefix(node, cut):
    """(post, scalars, other) of the first ``cut`` post-ops of ``node``'s chain."""
    other, post, scalars = fp.chain_of(node)
    head = post[:cut]
    n_sc = sum(fp.POST_OPS[p].arity for p in head)
    return head, list(scalars[:n_sc]), (other if any(fp.POST_OPS[p].binary for p in head) else None)


def cut_chain(gm, node, cut, expand_empty=True):
    """Keep the first ``cut`` post-ops on the fused op, run the rest as ATen after it.
    Returns (the head fused op, or None when ``cut`` is 0 and ``expand_empty`` made it
    plain ATen; the tail's post-op names)."""
    other, post, scalars = fp.chain_of(node)
    i_other, i_post, i_scalars = fp.CHAIN_ARGS[node.target]
    head, sc, o = chain_prefix(node, cut)
    n_sc = len(sc)
    args = list(node.args)
    args[i_other], args[i_post], args[i_scalars] = o, head, sc
    with gm.graph.inserting_before(node):
        head_node = gm.graph.call_function(node.target, tuple(args))
    head_node.meta.update(node.meta)  # elementwise post-ops: same shape, dtype, layout
    out = reference.apply_tail(gm, node, head_node, other, post[cut:], scalars[n_sc:])
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    if head or not expand_empty:
        return head_node, post[cut:]
    reference.expand(gm, head_node)
    return None, post[cut:]


def _chain_text(node):
    text = "+".join(fp.chain_of(node)[1]) or "no post-op"
    return f"int8 {text}" if node.target in fp.QUANTIZED_OPS else text
