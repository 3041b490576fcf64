"""Lowering: fused ops -> kernels of a target, as a table per target.

A target module exposes ``lower_node(gm, node) -> (kernel_name, new_node) | reason``.
Whatever a target cannot take stays a fusepass op, whose kernel is the ATen reference
(recorded as "kept" with the reason); a graph never fails to compile because one region
is unsupported. ``reference`` expands every fusepass op into plain ATen.
"""
from __future__ import annotations

import importlib.util

from fusepass import ops as fp
from fusepass.check import record_fused
from fusepass.lowering import onednn, reference

TARGETS = {"onednn": onednn, "reference": reference}


def ipex_available() -> bool:
    return importlib.util.find_spec("intel_extension_for_pytorch") is not None


def resolve(lowering: str, report):
    if lowering == "auto":
        lowering = "ipex" if ipex_available() else "onednn"
        report.record("lower", "-", "-", "info", f"lowering='auto' chose {lowering!r}")
    if lowering == "ipex":
        try:
            from fusepass.lowering import ipex  # noqa: F401
            TARGETS["ipex"] = ipex
        except Exception as e:  # absent or broken IPEX: the onednn target, said so
            report.record("lower", "-", "-", "fallback", f"ipex target unavailable ({e}); using onednn")
            lowering = "onednn"
    return TARGETS[lowering]


def lower(gm, options, report):
    target = resolve(options.lowering, report)
    fallback = onednn if target.__name__.endswith("ipex") else None
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in fp.FUSED_OPS:
            continue
        name, text = node.name, _chain_text(node)
        fused = record_fused(gm, node) if options.check else None
        try:
            out, via = target.lower_node(gm, node), ""
            if isinstance(out, str) and fallback is not None:
                first, out = out, fallback.lower_node(gm, node)
                if isinstance(out, str):
                    out = f"ipex: {first}; onednn: {out}"
                else:
                    via = f"ipex: {first}; onednn instead"
        except Exception as e:
            report.record("lower", "-", name, "error", f"{type(e).__name__}: {e}")
            continue
        if isinstance(out, str):
            report.record("lower", "reference", name, "kept", out)
            continue
        kernel, new = out
        note = None
        if new is not None:  # a target may say why it chose a kernel form (in place or not)
            note = new.meta.get("fusepass_lowering_note")
            if fused is not None:
                new.meta["fusepass_fused"] = fused
        report.record("lower", kernel, name, "lowered", "; ".join(filter(None, [text, via, note])))
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


def _chain_text(node):
    _, post, scalars = fp.chain_of(node)
    return "+".join(post) or "no post-op"
