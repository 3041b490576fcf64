"""The compute-precision decision (``Options.precision``), made once per variant before
capture, with its reason in the report.

Why it exists: fusepass never lowers precision silently (``precision="fp32"``, the
default), and where a user asks for bf16 the answer depends on the CPU, not on an
exception inside a kernel. ``precision="bf16"`` runs the conv/linear regions of an fp32
model in bf16 with fp32 at the graph's edges: capture traces the model under
``torch.autocast("cpu", torch.bfloat16)`` (the cast policy Inductor's bf16 and eager
autocast use, so the numerics are the ones a user already knows) and casts the outputs
back to the dtypes the model returns without it; the weight casts autocast adds are
folded into bf16 constants at compile time (``passes/fold_weight_casts.py``).

It applies only where the target has kernels that make bf16 worth it:
  * ``onednn``/``ipex``: native bf16 (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``:
    avx512bw/vl/dq, avx_ne_convert, AMX). Without it the model stays fp32 and the report
    says "CPU lacks native bf16": bf16 emulated through fp32 conversions is slower than
    fp32, and oneDNN's bf16 kernels would raise.
  * ``reference`` (plain ATen): applied on every CPU, ATen has bf16 kernels everywhere.
    It is the oracle of the bf16 path on CPUs that cannot run oneDNN's bf16 kernels.
A bf16 model, or an autocast region the user wrote, needs no decision here: its dtypes
are the user's, and the lowering table declines bf16 kernels on a CPU without native
bf16 (``fusepass/lowering/table.py``), so it runs on plain ATen, reported.
"""
from __future__ import annotations

from typing import Optional

import torch

from fusepass.lowering import table, targets_of

APPLIED = ("conv/linear regions run in bf16 (torch.autocast's CPU policy), fp32 at the "
           "graph's edges; weights cast to bf16 at compile time")


def autocast_state() -> tuple:
    """What the ambient CPU autocast does: part of a variant's key (a graph traced under
    autocast has its casts in it)."""
    enabled = torch.is_autocast_enabled("cpu")
    return (enabled, torch.get_autocast_dtype("cpu") if enabled else None)


def decide(options, report) -> Optional[torch.dtype]:
    """The dtype capture traces conv/linear regions in (``torch.autocast``), or None for
    the model's own dtypes; records the decision and why."""
    if options.precision == "fp32":
        return None
    rule = f"precision.{options.precision}"
    if autocast_state()[0]:
        report.record("capture", rule, "-", "info",
                      f"precision={options.precision!r}: an autocast context is active "
                      f"around the call ({autocast_state()[1]}); its policy decides, unchanged")
        return None
    targets = targets_of(options.lowering, available=True)
    if targets != ["reference"] and not table.native_bf16():
        report.record("capture", rule, "-", "declined",
                      f"precision='bf16' keeps fp32: {table.NO_BF16}")
        return None
    where = ("reference target: plain ATen bf16 kernels" if targets == ["reference"]
             else "CPU has native bf16")
    report.record("capture", rule, "-", "info", f"precision='bf16': {APPLIED} ({where})")
    return torch.bfloat16
