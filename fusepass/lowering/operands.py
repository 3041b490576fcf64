"""What every oneDNN-based target asks of a fused op's operands before picking a kernel:
known meta, one dtype the kernels take (fp32 or bf16), all on the CPU."""
from __future__ import annotations

import torch

from fusepass.ir import is_cpu_value
from fusepass.ops import KERNEL_DTYPES


def operand_reason(target: str, *values):
    """A reason the ``target`` kernels cannot take these operands (fake or loaded meta values, or None
    for an absent bias/other), or None."""
    vals = [v for v in values if v is not None]
    if not all(isinstance(v, torch.Tensor) for v in vals):
        return "operand without meta['val']"
    if vals[0].dtype not in KERNEL_DTYPES:
        return f"no {target} kernel for dtype {vals[0].dtype}"
    if any(v.dtype != vals[0].dtype for v in vals):
        return "mixed dtypes: " + ", ".join(str(v.dtype) for v in vals)
    if not all(is_cpu_value(v) for v in vals):  # a loaded graph's meta values: CPU
        return "an operand is not on the CPU"
    return None
