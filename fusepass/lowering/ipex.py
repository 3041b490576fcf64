"""The ipex target: Intel Extension for PyTorch's prepacked fused kernels (``ipex_prepack::*``).

Why: users pinned to torch 2.8 + IPEX 2.8 (IPEX's last CPU release; the project is
archived upstream) want fusepass's graphs to run on IPEX's kernels. Its rows of the
lowering table are registered always (the fuse pass's lowerable guard reads them without
IPEX installed); ``load()`` imports IPEX, and when that fails ``fusepass.lowering.resolve``
reports it and uses onednn. Whatever this table declines (a reason string) is offered to
the onednn target, and the report says so. The post-ops' run-op infixes and scalars come
from the registry (``fusepass/postops.py``, ``kernels["ipex"]``).

Each fused op becomes one ``*_run`` call on an op context prepacked at compile time from
the frozen weight constant (``convolution_prepack``, ``conv_transpose_prepack``,
``linear_prepack``), registered on the GraphModule as ``_fp_ipex_ctx_<i>`` and shared by
every op that uses the same weight, bias and conv parameters. The context holds its own
blocked copy of the weight, so the plain weight constant is dropped from the module once
nothing reads it.

Kernel facts this table relies on (IPEX 2.8.0 on torch 2.8.0, measured with
``scripts/ipex_probe.py`` and docs/ipex_kernels.md; re-check before adding a row):
* the ``_run`` op picks the post-op and its scalars; one plain context per weight serves
  every chain. The weight's dtype is the compute dtype: fp32 and bf16 only.
* ``elu`` ignores ``scale`` and ``input_scale``: lowered only when both are 1 (no SELU).
* ``*_add_run`` / ``*_add_relu_run`` / ``convolution_swish_add_run`` compute
  ``post(y + alpha*accumu)`` (swish *before* the add) and write into ``accumu`` when its
  layout is the output's (else return a fresh tensor); ``accumu`` must have the full
  output shape (a broadcast one fails at run time). ``other`` is therefore passed only
  when ``fusepass.ir.alias`` proves it dead and unaliased; otherwise a clone in
  the output's layout is.
* ``linear_mul_run`` gives garbage (no error) for a broadcast operand: full shape only.
* ``conv_transpose_add_run`` / ``_add_relu_run`` give wrong results: transposed convs
  take unary chains only. conv1d returns an (N, L, C)-strided output and is deprecated
  in IPEX 2.9: declined (onednn takes it).
* Output layout follows ATen's rule (channels-last if the input or weight suggests it);
  a fused op whose result is laid out otherwise is declined.
* These are TorchScript-only operators, not in the dispatcher: they have no fake kernel,
  and calling them on FakeTensors segfaults. Never fake-propagate a lowered IPEX graph;
  new nodes copy ``meta["val"]`` from the fused op instead.
"""
from __future__ import annotations

import math
import warnings

import torch

from fusepass import ops as fp
from fusepass.ir import constant, emit, infer_meta, is_constant, suggest_memory_format, val
from fusepass.ir import alias
from fusepass.lowering.operands import operand_reason
from fusepass.ops import KERNEL_DTYPES
from fusepass.lowering.table import register
from fusepass.postops import REGISTRY

P = torch.ops.ipex_prepack
aten = torch.ops.aten
CTX_PREFIX = "_fp_ipex_ctx_"


def load():
    import intel_extension_for_pytorch  # noqa: F401  (registers torch.ops.ipex_prepack.*)


def _family(kind):
    return "linear" if kind == "linear" else "conv"


def run_op(kind, chain, scalars):
    """(run op, mode, its scalars or alpha) for a chain, or a reason; pure. Modes:
    "unary" (``*_<infix>_run(x, *scalars, ctx)``), "accumulate" (``post(y + alpha*accumu)``)
    and "mul" (``linear_mul_run``)."""
    prefix = {"conv": "convolution", "conv_transpose": "conv_transpose", "linear": "linear"}[kind]
    fam = _family(kind)
    ks = [REGISTRY[p].kernel("ipex", fam) for p in chain]
    if any(k is None for k in ks):
        return f"no IPEX {kind.replace('_', ' ')} kernel for post-op chain {list(chain)}"
    binary = [REGISTRY[p].binary for p in chain]
    if not any(binary):  # () or one unary
        if len(chain) > 1:
            return f"no IPEX {kind.replace('_', ' ')} kernel for post-op chain {list(chain)}"
        run_scalars = ks[0].scalars(list(scalars)) if chain else []
        if isinstance(run_scalars, str):
            return run_scalars
        if any(isinstance(v, float) and not math.isfinite(v) for v in run_scalars):
            return f"post-op parameters {run_scalars} are not finite"
        op = f"{prefix}_{ks[0].attr}_run" if chain else f"{prefix}_run"
        return op, "unary", run_scalars
    if kind == "conv_transpose":  # IPEX's transposed add runs give wrong results
        return "IPEX's conv_transpose add runs give wrong results (measured): unary chains only"
    b = binary.index(True)
    if ks[b].attr == "mul":
        return (f"{prefix}_mul_run", "mul", None) if len(chain) == 1 else \
            f"no IPEX {kind} kernel for post-op chain {list(chain)}"
    alpha = ks[b].scalars([])[0]
    infix = "_".join(k.attr for k in ks)  # add, add_relu, swish_add
    return f"{prefix}_{infix}_run", "accumulate", alpha


# ----------------------------------------------------------------------------- checks

def _operand_reason(gm, x, w, b, other):
    if not is_constant(gm, w):
        return "weight is not a frozen constant (IPEX prepacks it at compile time)"
    if b is not None and not is_constant(gm, b):
        return "bias is not a frozen constant (IPEX prepacks it with the weight)"
    return operand_reason("IPEX", *(val(a) for a in (x, w, b, other)))


def _full_shape_reason(other, node, kind):
    o, y = val(other), val(node)
    if o is None or tuple(o.shape) != tuple(y.shape):
        shape = None if o is None else list(o.shape)
        return (f"IPEX's {kind} needs other with the output's full shape {list(y.shape)}, "
                f"got {shape} (no broadcast)")
    return None


def _conv_format(x, w, y):
    """The memory format IPEX's conv writes: channels-last when x or w suggests it."""
    if y.dim() not in (4, 5):
        return torch.contiguous_format
    cl = torch.channels_last if y.dim() == 4 else torch.channels_last_3d
    return cl if cl in (suggest_memory_format(val(x)), suggest_memory_format(val(w))) \
        else torch.contiguous_format


def _layout_reason(y, fmt):
    if y.is_contiguous(memory_format=fmt):
        return None
    return (f"the fused op's result has strides {tuple(y.stride())}, IPEX's kernel would "
            f"write {str(fmt).replace('torch.', '')}")


def _why_not_inplace(node, other, reads):
    return alias.why_not_inplace(node, other, reads=reads)


# ----------------------------------------------------------------------------- contexts

def _context(gm, kind, w, b, params, build):
    """(existing context node, None) or (None, (key, new context)); decides, never mutates.
    Keyed by the constants' attribute names (unique in gm and not reused while lowering,
    unlike data pointers once a dropped weight is freed)."""
    key = (kind, w.target, None if b is None else b.target, repr(params))
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.meta.get("fusepass_ipex_key") == key:
            return n, None
    return None, (key, build(constant(gm, w), None if b is None else constant(gm, b)))


def _attach(gm, node, found, fresh):
    if found is not None:
        return found
    key, ctx = fresh
    i = 0
    while hasattr(gm, f"{CTX_PREFIX}{i}"):
        i += 1
    name = f"{CTX_PREFIX}{i}"
    setattr(gm, name, ctx)
    with gm.graph.inserting_before(node), warnings.catch_warnings():
        # fx warns for attributes that are no Module/Parameter/buffer; a ScriptObject is fine
        warnings.simplefilter("ignore", UserWarning)
        n = gm.graph.get_attr(name)
    n.meta["fusepass_ipex_key"] = key
    return n


def _drop_if_unused(gm, n):
    """The context holds its own copy of the weight: forget the plain constant."""
    if n is None or n.users:
        return
    target = n.target
    gm.graph.erase_node(n)
    if target.startswith("_fp_") and not any(
            m.op == "get_attr" and m.target == target for m in gm.graph.nodes):
        gm._buffers.pop(target, None)


# ----------------------------------------------------------------------------- emitting

def _accumu(gm, node, other, reads, fmt):
    """``other`` itself when it is dead after the op, else a clone in the output's layout."""
    why = _why_not_inplace(node, other, reads)
    if why is None:
        return other, (f"accumulates in place into {other.name} (dead after the op; no input, "
                       "output, constant or alias of anything live)")
    with gm.graph.inserting_before(node):
        c = gm.graph.call_function(aten.clone.default, (other,), {"memory_format": fmt})
    infer_meta(gm, c)
    return c, f"accumulates into a clone of {other.name}: {why}"


def _run(name):
    return getattr(P, name).default


def _lower(gm, node, kind, x, w, b, other, chain, scalars, fmt, params, build):
    """Shared by conv and linear: choose the run op for the chain, then mutate."""
    chosen = run_op(kind, chain, scalars)
    if isinstance(chosen, str):
        return chosen
    op, mode, run_scalars = chosen
    if mode == "accumulate":
        alpha = run_scalars
    if mode != "unary" and (reason := _full_shape_reason(other, node, op)):
        return reason
    try:
        found, fresh = _context(gm, kind, w, b, params, build)
    except Exception as e:  # IPEX refused the weight: decline, nothing mutated yet
        prefix = {"conv": "convolution", "conv_transpose": "conv_transpose", "linear": "linear"}[kind]
        return f"IPEX {prefix}_prepack failed: {type(e).__name__}: {e}"
    ctx = _attach(gm, node, found, fresh)
    if mode == "unary":
        new = emit(gm, node, _run(op), (x, *run_scalars, ctx))
    elif mode == "mul":
        new = emit(gm, node, _run(op), (x, other, ctx))
    else:
        acc, note = _accumu(gm, node, other, (x, w, b), fmt)
        new = emit(gm, node, _run(op), (x, acc), {"alpha": alpha, "W_prepack": ctx}, note)
    _drop_if_unused(gm, w)
    _drop_if_unused(gm, b)
    return f"ipex_prepack.{op}", new


# ----------------------------------------------------------------------------- the table

def lower_conv(gm, node):
    (x, w, b, stride, padding, dilation, transposed, output_padding, groups,
     other, post, scalars) = node.args
    if (reason := _operand_reason(gm, x, w, b, other)):
        return reason
    y = val(node)
    if y.dim() == 3 and not transposed:
        return ("IPEX's conv1d writes an (N, L, C)-strided output and is deprecated in "
                "IPEX 2.9")
    fmt = _conv_format(x, w, y)
    if (reason := _layout_reason(y, fmt)):
        return reason
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    cl = suggest_memory_format(val(x)) in (torch.channels_last, torch.channels_last_3d)
    sizes = list(val(x).shape)
    if transposed:
        output_padding = list(output_padding)
        params = (stride, padding, output_padding, groups, dilation)

        def build(wt, bt):
            return P.conv_transpose_prepack(wt, bt, stride, padding, output_padding, groups,
                                            dilation, cl, sizes)
        return _lower(gm, node, "conv_transpose", x, w, b, other, post, scalars, fmt, params,
                      build)

    params = (stride, padding, dilation, groups)

    def build(wt, bt):
        return P.convolution_prepack(wt, bt, stride, padding, dilation, groups, cl, sizes)
    return _lower(gm, node, "conv", x, w, b, other, post, scalars, fmt, params, build)


def lower_linear(gm, node):
    x, w, b, other, post, scalars = node.args
    if (reason := _operand_reason(gm, x, w, b, other)):
        return reason
    if val(x).dim() < 2:
        return "linear on a 1-d input"
    if (reason := _layout_reason(val(node), torch.contiguous_format)):
        return reason
    rows = math.prod(val(x).shape[:-1])

    def build(wt, bt):
        return P.linear_prepack(wt, bt, rows)  # rows: a hint only; any batch runs
    return _lower(gm, node, "linear", x, w, b, other, post, scalars, torch.contiguous_format,
                  (), build)


def check(f):
    """The pure part of the choice (the rest — constant weights, layouts, prepacking —
    is checked by the builders, which return a reason before they mutate)."""
    if (reason := operand_reason("IPEX", f.x, f.weight, f.bias, f.other)):
        return reason
    if f.family == "linear":
        if f.x.dim() < 2:
            return "linear on a 1-d input"
        kind = "linear"
    else:
        if f.out is not None and f.out.dim() == 3 and not f.transposed:
            return ("IPEX's conv1d writes an (N, L, C)-strided output and is deprecated in "
                    "IPEX 2.9")
        kind = "conv_transpose" if f.transposed else "conv"
    chosen = run_op(kind, f.post, f.scalars)
    return chosen if isinstance(chosen, str) else None


SHAPES = [(), ("unary",), ("binary",), ("binary", "unary"), ("unary", "binary")]
register("ipex", fp.conv, SHAPES, KERNEL_DTYPES, check, lower_conv)
register("ipex", fp.linear, SHAPES[:4], KERNEL_DTYPES, check, lower_linear)
