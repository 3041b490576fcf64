"""Named, pure guards of the ``fold.*`` rows (constant folding into conv/linear weights).

Like ``guards.py`` they return a reason to decline or None and never mutate. Unlike the
fusion guards, a few of them read the *values* of constants (finiteness, division by
zero): a constant's value is what folding is about. Constants are frozen ``get_attr``
tensors or deterministic expressions over them (``view(w)``), which ``constant_value``
evaluates without touching the graph.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.fx as fx
from torch._prims_common import suggest_memory_format

from fusepass import ops as fp


def _kind(m):
    return "conv" if m.fused.target is fp.conv else "linear"


def is_constant_expr(gm, node, depth=0) -> bool:
    """A frozen constant or a deterministic expression over frozen constants only."""
    if not isinstance(node, fx.Node):
        return True
    if node.op == "get_attr":
        return isinstance(getattr(gm, node.target, None), torch.Tensor)
    if node.op != "call_function" or depth > 64 or node.target in fp.FUSED_OPS:
        return False
    if torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ()):
        return False
    return all(is_constant_expr(gm, a, depth + 1) for a in node.all_input_nodes)


def cast_of(node) -> tuple | None:
    """(source node, dtype) when ``node`` only changes the dtype of its input (the
    spellings capture leaves: ``_to_copy(t, dtype=)``, ``convert_element_type``)."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or not node.args:
        return None
    if node.target is torch.ops.aten._to_copy.default:
        extra = {k: v for k, v in node.kwargs.items() if k != "dtype"}
        src = node.args[0]
        v = src.meta.get("val") if isinstance(src, fx.Node) else None
        if len(node.args) > 1 or "dtype" not in node.kwargs or v is None:
            return None
        same = {"layout": v.layout, "device": v.device, "pin_memory": False,
                "non_blocking": False, "memory_format": torch.preserve_format}
        if any(k not in same or extra[k] not in (same[k], None) for k in extra):
            return None
        return src, node.kwargs["dtype"]
    if node.target is torch.ops.prims.convert_element_type.default and len(node.args) == 2:
        return node.args[0], node.args[1]
    return None


def constant_value(gm, node, memo=None):
    """Evaluate a constant expression on the real tensors (never in-place, never cached
    on the graph). ``memo`` may be shared by calls evaluating one graph."""
    memo = {} if memo is None else memo
    if not isinstance(node, fx.Node):
        return node
    if node not in memo:
        if node.op == "get_attr":
            memo[node] = getattr(gm, node.target)
        else:
            ev = lambda a: constant_value(gm, a, memo)  # noqa: E731
            args = fx.node.map_arg(node.args, ev)
            kwargs = fx.node.map_arg(node.kwargs, ev)
            with torch.no_grad(), torch._subclasses.fake_tensor.unset_fake_temporarily():
                memo[node] = node.target(*args, **kwargs)
    return memo[node]


def plain_op(m):
    """The conv/linear carries no post-op yet (folds run before fusion)."""
    _, post, _ = fp.chain_of(m.fused)
    return f"{m.fused.name} already carries post-ops {post}" if post else None


def weights_constant(m):
    node = m.fused
    for what, arg in (("weight", node.args[1]), ("bias", node.args[2])):
        if not is_constant_expr(m.gm, arg):
            return f"{what} of {node.name} is not a frozen constant"
    return None


def float_result(m):
    dt = m.fused.meta["val"].dtype
    if not dt.is_floating_point:
        return f"integer {_kind(m)} output ({dt}): folding through float64 is not exact"
    return None


def constant_operand(m) -> bool:
    """Silent filter (``when``): the other operand is a real number or a constant tensor.
    ``conv(x) + t`` with ``t`` computed at runtime is no fold candidate (it is the fuse
    pass's binary post-op), so it is not reported here."""
    c = m["c"]
    if isinstance(c, fx.Node):
        return is_constant_expr(m.gm, c)
    return isinstance(c, numbers.Number) and not isinstance(c, complex)


def per_channel(m):
    """The constant varies at most along the output-channel dim and does not enlarge y."""
    c = m.val("c")
    if not isinstance(c, torch.Tensor):
        return None
    y, out = m.fused.meta["val"], m.anchor.meta["val"]
    kind = _kind(m)
    if tuple(out.shape) != tuple(y.shape):
        return (f"constant of shape {tuple(c.shape)} would enlarge the {kind} output "
                f"{tuple(y.shape)} to {tuple(out.shape)}")
    channel = 1 if kind == "conv" else y.dim() - 1
    off = y.dim() - c.dim()
    bad = [off + i for i, s in enumerate(c.shape) if s != 1 and off + i != channel]
    if bad:
        return (f"constant of shape {tuple(c.shape)} broadcasts along non-channel dim(s) "
                f"{bad} of the {kind} output {tuple(y.shape)}")
    return None


def no_promotion(m):
    y, out = m.fused.meta["val"], m.anchor.meta["val"]
    if out.dtype != y.dtype:
        c = m.val("c")
        cd = c.dtype if isinstance(c, torch.Tensor) else type(c).__name__
        return f"dtype promotion: {y.dtype} {_kind(m)} output with a {cd} constant gives {out.dtype}"
    return None


def _all_finite(v) -> bool:
    if isinstance(v, torch.Tensor):
        return not v.is_floating_point() or bool(torch.isfinite(v).all())
    return math.isfinite(v)


def finite_constant(m):
    c = constant_value(m.gm, m["c"])
    alpha = m.bindings.get("alpha", 1)
    if not _all_finite(c) or not _all_finite(alpha):
        return "constant is not finite (inf or nan)"
    return None


def nonzero_divisor(m):
    c = constant_value(m.gm, m["c"])
    zero = bool((c == 0).any()) if isinstance(c, torch.Tensor) else c == 0
    return "division by zero in the constant divisor" if zero else None


def not_affine(m):
    return f"c / {_kind(m)}(x) is not affine in x: it cannot fold into the weights"


def bn_eval(m):
    if m.bindings.get("training", False):
        return "BatchNorm in training mode normalizes with batch statistics"
    if m["mean"] is None or m["var"] is None:
        return "BatchNorm without running statistics normalizes with batch statistics"
    return None


def bn_channels(m):
    y = m.fused.meta["val"]
    if _kind(m) == "linear" and y.dim() != 2:
        return (f"BatchNorm normalizes dim 1 of the {y.dim()}-d linear output "
                f"{tuple(y.shape)}, not its output features")
    return None


def bn_layout(m):
    """The folded conv returns its own strides where BatchNorm's result had BatchNorm's.
    They differ only where the conv's are ambiguous (C == 1: contiguous and channels-last
    at once, and the CPU BatchNorm returns contiguous); a later conv reads even a size-1
    dim's stride to choose its layout, so folding would change the layout downstream."""
    y, out = m.fused.meta.get("val"), m.anchor.meta.get("val")
    if y is None or out is None or y.shape != out.shape or y.dim() not in (4, 5):
        return None
    if suggest_memory_format(y) == suggest_memory_format(out):
        return None  # what a conv reading it decides is the same
    return (f"BatchNorm returns strides {tuple(out.stride())}, the conv {tuple(y.stride())} "
            "(ambiguous with a size-1 dim): folding would change the layout a later op reads")


def bn_constant(m):
    for name in ("bn_weight", "bn_bias", "mean", "var"):
        if m[name] is not None and not is_constant_expr(m.gm, m[name]):
            return f"BatchNorm {name} is not a frozen constant"
    return None


def bn_finite(m):
    var = constant_value(m.gm, m["var"]).double() + m["eps"]
    if not bool((var > 0).all()) or not math.isfinite(m["eps"]):
        return "running_var + eps is not positive"
    for name in ("bn_weight", "bn_bias", "mean"):
        if m[name] is not None and not _all_finite(constant_value(m.gm, m[name])):
            return f"BatchNorm {name} is not finite"
    return None
