#!/usr/bin/env python
"""Probe Intel Extension for PyTorch's fused conv / linear kernels called directly.

Run in the IPEX environment (see scripts/ipex_env.sh):

    /work/main/.venv-ipex/bin/python scripts/ipex_probe.py [--quick] [--json out.json]

For fp32 and bf16 it calls ``torch.ops.ipex_prepack.<op>_prepack`` /
``<op>_run`` on random tensors and compares with eager ATen, then checks shape
flexibility of a prepacked context (batch / spatial size, channels_last,
conv1d / conv3d, groups), aliasing of the in-place ``accumu`` ops, which
scalar (prepack-time or run-time) the kernel honours, and times prepack and
the fp32 linear paths.  Everything is printed as plain text; ``--json`` also
dumps the raw records.  This file is a probe, not part of the fusepass package.
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import statistics
import sys
import time
import traceback
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

try:
    import intel_extension_for_pytorch as ipex  # noqa: E402
except Exception as exc:  # pragma: no cover - only meaningful outside the IPEX venv
    sys.exit(f"intel_extension_for_pytorch not importable ({exc!r}); run with .venv-ipex/bin/python")

P = torch.ops.ipex_prepack
TI = torch.ops.torch_ipex

RECORDS: list[dict] = []

# FAILs that document real kernel limitations (see docs/ipex_kernels.md), not probe bugs.
KNOWN_LIMITATIONS = {
    "elu(0.7,1.3,0.9)",                # scale / input_scale are ignored by IPEX (only alpha is used)
    "accumu broadcast [1,C,1,1]",      # accumu must have the full output shape
    "add with broadcast accumu [N]",   # idem for linear_add_run
}


def record(section: str, name: str, dtype, ok, err=None, note: str = "") -> None:
    rec = {
        "section": section,
        "name": name,
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else "-",
        "ok": ok,
        "max_abs_err": None if err is None else float(err),
        "note": note,
    }
    RECORDS.append(rec)
    status = {True: "OK  ", False: "FAIL", None: "INFO"}[ok]
    e = "" if err is None else f" err={float(err):.3g}"
    print(f"  [{status}] {section:<8} {name:<44} {rec['dtype']:<8}{e} {note}".rstrip())


def short_exc(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    msg = [m for m in msg if m.strip()]
    return (type(exc).__name__ + ": " + (msg[0] if msg else ""))[:160]


def layout(t: torch.Tensor) -> str:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return "channels_last"
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous():
        return "channels_last_3d"
    if t.is_contiguous():
        return "contiguous"
    return f"strided{tuple(t.stride())}"


# ----------------------------------------------------------------------------- helpers

def conv_nd(x, w, b, stride, padding, dilation, groups):
    fn = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[w.dim()]
    return fn(x, w, b, stride, padding, dilation, groups)


def tol_for(dtype):
    return 1e-4 if dtype == torch.float32 else 0.0  # bf16: judged relative to eager's own error


def compare(out, ref32, eager, dtype):
    """Return (ok, ipex_err, eager_err): errors measured vs an fp32 reference
    computed from the (already dtype-rounded) inputs.  fp32: ok iff err<=1e-4 (scaled).
    bf16: ok iff ipex error <= max(2 * eager bf16 error, 0.05 * max|ref|)."""
    err = (out.float() - ref32).abs().max().item()
    eerr = (eager.float() - ref32).abs().max().item()
    scale = max(1.0, ref32.abs().max().item())
    if dtype == torch.float32:
        ok = err <= 1e-4 * scale
    else:
        ok = err <= max(2 * eerr, 0.05 * scale)
    return ok, err, eerr


# name -> (prepack extra positional args, run extra positional args, eager post-op)
def conv_posts():
    return {
        "relu": ((), (), F.relu),
        "gelu[none]": (("none",), ("none",), lambda y: F.gelu(y)),
        "gelu[tanh]": (("tanh",), ("tanh",), lambda y: F.gelu(y, approximate="tanh")),
        "swish": ((), (), F.silu),
        "sigmoid": ((), (), torch.sigmoid),
        "tanh": ((), (), torch.tanh),
        "hardtanh(-0.5,0.75)": ((-0.5, 0.75), (-0.5, 0.75), lambda y: F.hardtanh(y, -0.5, 0.75)),
        "hardtanh(0,6)=relu6": ((0.0, 6.0), (0.0, 6.0), lambda y: F.hardtanh(y, 0.0, 6.0)),
        "elu(1,1,1)": ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0), F.elu),
        "elu(0.7,1,1)": ((0.7, 1.0, 1.0), (0.7, 1.0, 1.0), lambda y: F.elu(y, 0.7)),
        "elu(0.7,1.3,0.9)": ((0.7, 1.3, 0.9), (0.7, 1.3, 0.9),
                             lambda y: torch.ops.aten.elu(y, 0.7, 1.3, 0.9)),
        "leaky_relu(0.1)": ((0.1,), (0.1,), lambda y: F.leaky_relu(y, 0.1)),
        "hardswish": ((), (), F.hardswish),
        "hardsigmoid": ((), (), F.hardsigmoid),
        "mish": ((), (), F.mish),
        # extras present in IPEX 2.8 (not requested, cheap to check)
        "abs": ((), (), torch.abs),
        "exp": ((), (), torch.exp),
        "square": ((), (), torch.square),
        "pow(2.0)": ((2.0,), (2.0,), lambda y: torch.pow(y, 2.0)),
        "round": ((), (), torch.round),
    }


def op_base(name: str) -> str:
    base = name.split("(")[0].split("[")[0]
    return {"hardtanh": "hardtanh"}.get(base, base)


def rand_conv(dtype, n=2, cin=16, cout=32, hw=(14, 14), k=3, groups=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    nd = len(hw)
    x = torch.randn(n, cin, *hw, generator=g)
    fan_in = (cin // groups) * k ** nd
    w = torch.randn(cout, cin // groups, *([k] * nd), generator=g) * (2.0 / fan_in) ** 0.5
    b = torch.randn(cout, generator=g) * 0.1
    return x.to(dtype), w.to(dtype), b.to(dtype)


# ----------------------------------------------------------------------------- conv post-ops

def probe_conv_posts(dtype):
    print(f"\n== conv2d + post-op ({dtype}) : N=2 Cin=16 Cout=32 14x14 k3 s1 p1 ==")
    x, w, b = rand_conv(dtype)
    stride, pad, dil, groups = [1, 1], [1, 1], [1, 1], 1
    y32 = conv_nd(x.float(), w.float(), b.float(), stride, pad, dil, groups)
    ye = conv_nd(x, w, b, stride, pad, dil, groups)

    # plain conv
    try:
        ctx = P.convolution_prepack(w, b, stride, pad, dil, groups, False, list(x.shape))
        out = P.convolution_run(x, ctx)
        ok, err, eerr = compare(out, y32, ye, dtype)
        record("conv", "(none) convolution_run", dtype, ok, err,
               f"eager_err={eerr:.3g} out={layout(out)} {out.dtype}")
    except Exception as exc:
        record("conv", "(none) convolution_run", dtype, False, note=short_exc(exc))

    for name, (pre_args, run_args, post) in conv_posts().items():
        base = op_base(name)
        try:
            prep = getattr(P, f"convolution_{base}_prepack")
            run = getattr(P, f"convolution_{base}_run")
            ctx = prep(w, b, stride, pad, dil, groups, False, list(x.shape), *pre_args)
            out = run(x, *run_args, ctx)
            ref32 = post(y32)
            eager = post(ye)
            ok, err, eerr = compare(out, ref32, eager, dtype)
            record("conv", name, dtype, ok, err, f"eager_err={eerr:.3g} out={layout(out)} {out.dtype}")
        except Exception as exc:
            record("conv", name, dtype, False, note=short_exc(exc))

    # ELU: which of (alpha, scale, input_scale) does the kernel honour?
    try:
        a, sc, isc = 0.7, 1.3, 0.9
        ctx = P.convolution_elu_prepack(w, b, stride, pad, dil, groups, False, list(x.shape), a, sc, isc)
        out = P.convolution_elu_run(x, a, sc, isc, ctx).float()
        e_alpha_only = (out - F.elu(y32, a)).abs().max().item()
        e_aten = (out - torch.ops.aten.elu(y32, a, sc, isc)).abs().max().item()
        record("scalar", "elu(0.7,1.3,0.9) computes F.elu(y, alpha)?", dtype, None,
               note=f"err vs F.elu(y,alpha)={e_alpha_only:.3g}, vs aten.elu(y,a,s,i)={e_aten:.3g} "
                    f"=> scale/input_scale {'IGNORED' if e_alpha_only < e_aten else 'honoured'}")
    except Exception as exc:
        record("scalar", "elu semantics", dtype, False, note=short_exc(exc))

    # does the post-op come from the prepack op or from the run op?
    try:
        c_plain = P.convolution_prepack(w, b, stride, pad, dil, groups, False, list(x.shape))
        c_relu = P.convolution_relu_prepack(w, b, stride, pad, dil, groups, False, list(x.shape))
        checks = {
            "convolution_prepack ctx -> gelu_run('tanh')":
                (P.convolution_gelu_run(x, "tanh", c_plain), F.gelu(ye, approximate="tanh"),
                 F.gelu(y32, approximate="tanh")),
            "convolution_relu_prepack ctx -> convolution_run":
                (P.convolution_run(x, c_relu), ye, y32),
            "convolution_relu_prepack ctx -> sigmoid_run":
                (P.convolution_sigmoid_run(x, c_relu), torch.sigmoid(ye), torch.sigmoid(y32)),
        }
        acc = torch.randn(y32.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        acc0 = acc.clone()
        checks["convolution_prepack ctx -> add_run"] = (
            P.convolution_add_run(x, acc, alpha=1.0, W_prepack=c_plain), ye + acc0, y32 + acc0.float())
        for label, (out, eager, ref32) in checks.items():
            ok, err, eerr = compare(out, ref32, eager, dtype)
            record("ctx", label, dtype, ok, err, "post-op is chosen by the RUN op" if ok else "")
    except Exception as exc:
        record("ctx", "ctx interchangeability", dtype, False, note=short_exc(exc))

    # which scalar wins: the one given at prepack or the one given at run?
    def which(base, pre_args, run_args, f_pre, f_run, y=y32):
        ctx = getattr(P, f"convolution_{base}_prepack")(w, b, stride, pad, dil, groups, False,
                                                         list(x.shape), *pre_args)
        out = getattr(P, f"convolution_{base}_run")(x, *run_args, ctx).float()
        e_pre = (out - f_pre(y)).abs().max().item()
        e_run = (out - f_run(y)).abs().max().item()
        return "PREPACK" if e_pre < e_run else "RUN", e_pre, e_run

    for label, args in {
        "hardtanh": ((-0.5, 0.75), (-1.0, 1.0), lambda y: F.hardtanh(y, -0.5, 0.75),
                     lambda y: F.hardtanh(y, -1.0, 1.0)),
        "leaky_relu": ((0.1,), (0.3,), lambda y: F.leaky_relu(y, 0.1), lambda y: F.leaky_relu(y, 0.3)),
        "gelu": (("tanh",), ("none",), lambda y: F.gelu(y, approximate="tanh"), F.gelu),
        "elu": ((0.7, 1.3, 0.9), (1.0, 1.0, 1.0), lambda y: torch.ops.aten.elu(y, 0.7, 1.3, 0.9), F.elu),
    }.items():
        try:
            winner, e_pre, e_run = which(label, *args)
            record("scalar", f"{label}: prepack vs run scalar", dtype, None,
                   note=f"{winner} value is used (err vs prepack-ref={e_pre:.3g}, vs run-ref={e_run:.3g})")
        except Exception as exc:
            record("scalar", f"{label}: prepack vs run scalar", dtype, False, note=short_exc(exc))


# ----------------------------------------------------------------------------- conv + add

def probe_conv_add(dtype):
    print(f"\n== conv2d + add (accumu, in place) ({dtype}) ==")
    x, w, b = rand_conv(dtype)
    stride, pad, dil, groups = [1, 1], [1, 1], [1, 1], 1
    y32 = conv_nd(x.float(), w.float(), b.float(), stride, pad, dil, groups)
    ye = conv_nd(x, w, b, stride, pad, dil, groups)
    other = torch.randn(y32.shape, generator=torch.Generator().manual_seed(7)).to(dtype)

    cases = {
        "add": ("add", lambda y, o, a: y + a * o),
        "add_relu": ("add_relu", lambda y, o, a: F.relu(y + a * o)),
        "swish_add": ("swish_add", lambda y, o, a: F.silu(y) + a * o),
    }
    for label, (base, ref_fn) in cases.items():
        for alpha in (1.0, 0.5, -1.0):
            name = f"{label} alpha={alpha}"
            try:
                ctx = getattr(P, f"convolution_{base}_prepack")(
                    w, b, stride, pad, dil, groups, False, list(x.shape), alpha=alpha)
                acc = other.clone()
                ptr = acc.data_ptr()
                out = getattr(P, f"convolution_{base}_run")(x, acc, alpha=alpha, W_prepack=ctx)
                ref32 = ref_fn(y32, other.float(), alpha)
                eager = ref_fn(ye, other, alpha)
                ok, err, eerr = compare(out, ref32, eager, dtype)
                alt = ""
                if not ok:
                    # try other plausible semantics to document what the kernel computes
                    for sem, f in {
                        "alpha*conv+other": lambda y, o: (alpha * y + o),
                        "conv+other(alpha ignored)": lambda y, o: y + o,
                        "swish(conv+other)": lambda y, o: F.silu(y + o),
                        "relu(conv)+other": lambda y, o: F.relu(y) + o,
                    }.items():
                        e2 = (out.float() - f(y32, other.float())).abs().max().item()
                        if e2 < 0.05 * max(1.0, ref32.abs().max().item()):
                            alt = f" ACTUAL={sem}(err {e2:.3g})"
                inplace = (acc.data_ptr() == ptr and out.data_ptr() == acc.data_ptr())
                acc_changed = not torch.equal(acc, other)
                record("add", name, dtype, ok, err,
                       f"eager_err={eerr:.3g} returns_accumu={inplace} accumu_overwritten={acc_changed} "
                       f"out={layout(out)}{alt}")
            except Exception as exc:
                record("add", name, dtype, False, note=short_exc(exc))

    # alpha: prepack vs run
    try:
        ctx = P.convolution_add_prepack(w, b, stride, pad, dil, groups, False, list(x.shape), alpha=0.5)
        acc = other.clone()
        out = P.convolution_add_run(x, acc, alpha=1.0, W_prepack=ctx).float()
        e_pre = (out - (y32 + 0.5 * other.float())).abs().max().item()
        e_run = (out - (y32 + other.float())).abs().max().item()
        record("scalar", "add alpha: prepack(0.5) vs run(1.0)", dtype, None,
               note=f"{'PREPACK' if e_pre < e_run else 'RUN'} alpha is used ({e_pre:.3g} / {e_run:.3g})")
    except Exception as exc:
        record("scalar", "add alpha: prepack vs run", dtype, False, note=short_exc(exc))

    # accumu layout / dtype variations
    ctx = P.convolution_add_prepack(w, b, stride, pad, dil, groups, False, list(x.shape), alpha=1.0)
    for label, xin, acc in [
        ("x contiguous, accumu channels_last", x, other.clone().to(memory_format=torch.channels_last)),
        ("x channels_last, accumu contiguous", x.to(memory_format=torch.channels_last), other.clone()),
        ("x channels_last, accumu channels_last", x.to(memory_format=torch.channels_last),
         other.clone().to(memory_format=torch.channels_last)),
        ("accumu fp32 with %s input" % str(dtype).replace("torch.", ""), x, other.float().clone()),
        ("accumu broadcast [1,C,1,1]", x, torch.randn(1, y32.shape[1], 1, 1).to(dtype)),
    ]:
        try:
            ptr = acc.data_ptr()
            acc0 = acc.clone()
            out = P.convolution_add_run(xin, acc, alpha=1.0, W_prepack=ctx)
            ref32 = y32 + acc0.float()
            eager = ye + acc0
            ok, err, eerr = compare(out, ref32, eager, dtype) if out.shape == ref32.shape else (False, None, 0)
            record("add", label, dtype, ok, err,
                   f"out={layout(out)} {out.dtype} returns_accumu={out.data_ptr() == ptr} "
                   f"accumu_overwritten={not torch.equal(acc, acc0)}")
        except Exception as exc:
            record("add", label, dtype, False, note=short_exc(exc))


# ----------------------------------------------------------------------------- conv flexibility

def probe_conv_flex(dtype):
    print(f"\n== conv prepacked-context flexibility ({dtype}) ==")
    x, w, b = rand_conv(dtype)
    stride, pad, dil = [1, 1], [1, 1], [1, 1]
    ctx = P.convolution_relu_prepack(w, b, stride, pad, dil, 1, False, list(x.shape))

    def check(label, xin, ctx_, w_=w, b_=b, st=stride, pd=pad, dl=dil, g=1, post=F.relu, runner=None):
        try:
            out = (runner or P.convolution_relu_run)(xin, ctx_)
            ref32 = post(conv_nd(xin.float(), w_.float(), None if b_ is None else b_.float(), st, pd, dl, g))
            eager = post(conv_nd(xin, w_, b_, st, pd, dl, g))
            ok, err, eerr = compare(out, ref32, eager, dtype)
            record("flex", label, dtype, ok, err,
                   f"in={layout(xin)} out={layout(out)} shape={tuple(out.shape)}")
        except Exception as exc:
            record("flex", label, dtype, False, note=short_exc(exc))

    g = torch.Generator().manual_seed(3)
    check("same shape as prepack [2,16,14,14]", x, ctx)
    check("batch 1 (prepacked for 2)", torch.randn(1, 16, 14, 14, generator=g).to(dtype), ctx)
    check("batch 7 (prepacked for 2)", torch.randn(7, 16, 14, 14, generator=g).to(dtype), ctx)
    check("spatial 31x9 (prepacked for 14x14)", torch.randn(2, 16, 31, 9, generator=g).to(dtype), ctx)
    check("channels_last input, ctx prepacked contiguous",
          x.to(memory_format=torch.channels_last), ctx)
    ctx_cl = P.convolution_relu_prepack(w, b, stride, pad, dil, 1, True, list(x.shape))
    check("channels_last input, ctx prepacked input_is_channels_last=True",
          x.to(memory_format=torch.channels_last), ctx_cl)
    check("contiguous input, ctx prepacked input_is_channels_last=True", x, ctx_cl)
    ctx_empty = P.convolution_relu_prepack(w, b, stride, pad, dil, 1, False, [])
    check("input_sizes=[] at prepack, run [2,16,14,14]", x, ctx_empty)
    check("input_sizes=[] at prepack, run [3,16,20,20]",
          torch.randn(3, 16, 20, 20, generator=g).to(dtype), ctx_empty)
    ctx_nb = P.convolution_relu_prepack(w, None, stride, pad, dil, 1, False, list(x.shape))
    check("bias=None", x, ctx_nb, b_=None)
    # non-contiguous (sliced) input
    xs = torch.randn(2, 32, 14, 14, generator=g).to(dtype)[:, ::2]
    check("non-contiguous input (channel slice)", xs, ctx)
    # wrong channel count
    try:
        P.convolution_relu_run(torch.randn(2, 8, 14, 14).to(dtype), ctx)
        record("flex", "wrong Cin (8 vs 16)", dtype, False, note="no error raised!")
    except Exception as exc:
        record("flex", "wrong Cin (8 vs 16)", dtype, None, note="raises " + short_exc(exc))
    # dtype mismatch
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    try:
        xo = x.to(other)
        out = P.convolution_relu_run(xo, ctx)
        e = (out.float() - F.relu(conv_nd(xo.float(), w.float(), b.float(), stride, pad, dil, 1))).abs().max()
        record("flex", f"input {other} into {dtype} ctx", dtype, None,
               note=f"no error; out dtype={out.dtype}, err vs fp32 ref={e:.3g} (bf16-level)")
    except Exception as exc:
        record("flex", f"input {other} into {dtype} ctx", dtype, None, note="raises " + short_exc(exc))

    # strides / padding / dilation / groups / 1d / 3d
    for label, kw in [
        ("stride 2, pad 1 (k3)", dict(st=[2, 2], pd=[1, 1], dl=[1, 1], g=1, k=3, cin=16, cout=32)),
        ("asym stride (2,1) pad (0,2) dil (1,2)", dict(st=[2, 1], pd=[0, 2], dl=[1, 2], g=1, k=3, cin=16, cout=32)),
        ("1x1 conv", dict(st=[1, 1], pd=[0, 0], dl=[1, 1], g=1, k=1, cin=16, cout=32)),
        ("7x7 s2 p3, Cin=3 (stem)", dict(st=[2, 2], pd=[3, 3], dl=[1, 1], g=1, k=7, cin=3, cout=16)),
        ("groups=4", dict(st=[1, 1], pd=[1, 1], dl=[1, 1], g=4, k=3, cin=16, cout=32)),
        ("depthwise groups=32 (Cin=Cout=32)", dict(st=[1, 1], pd=[1, 1], dl=[1, 1], g=32, k=3, cin=32, cout=32)),
        ("depthwise s2 (MobileNet)", dict(st=[2, 2], pd=[1, 1], dl=[1, 1], g=32, k=3, cin=32, cout=32)),
    ]:
        xx, ww, bb = rand_conv(dtype, cin=kw["cin"], cout=kw["cout"], k=kw["k"], groups=kw["g"], seed=5)
        try:
            c = P.convolution_relu_prepack(ww, bb, kw["st"], kw["pd"], kw["dl"], kw["g"], False, list(xx.shape))
        except Exception as exc:
            record("flex", label, dtype, False, note="prepack: " + short_exc(exc))
            continue
        check(label, xx, c, w_=ww, b_=bb, st=kw["st"], pd=kw["pd"], dl=kw["dl"], g=kw["g"])
        check(label + " +channels_last in", xx.to(memory_format=torch.channels_last), c,
              w_=ww, b_=bb, st=kw["st"], pd=kw["pd"], dl=kw["dl"], g=kw["g"])

    for label, hw in [("conv1d", (20,)), ("conv3d", (6, 7, 8))]:
        xx, ww, bb = rand_conv(dtype, hw=hw, seed=9)
        nd = len(hw)
        try:
            c = P.convolution_relu_prepack(ww, bb, [1] * nd, [1] * nd, [1] * nd, 1, False, list(xx.shape))
            check(label + " relu", xx, c, w_=ww, b_=bb, st=[1] * nd, pd=[1] * nd, dl=[1] * nd)
            if nd == 3:
                check(label + " relu, channels_last_3d in", xx.to(memory_format=torch.channels_last_3d), c,
                      w_=ww, b_=bb, st=[1] * nd, pd=[1] * nd, dl=[1] * nd)
            c2 = P.convolution_add_prepack(ww, bb, [1] * nd, [1] * nd, [1] * nd, 1, False, list(xx.shape),
                                           alpha=1.0)
            y = conv_nd(xx.float(), ww.float(), bb.float(), [1] * nd, [1] * nd, [1] * nd, 1)
            acc = torch.randn(y.shape).to(dtype)
            acc0 = acc.clone()
            out = P.convolution_add_run(xx, acc, alpha=1.0, W_prepack=c2)
            ok, err, eerr = compare(out, y + acc0.float(), conv_nd(xx, ww, bb, [1] * nd, [1] * nd, [1] * nd, 1) + acc0,
                                    dtype)
            record("flex", label + " add", dtype, ok, err, f"out={layout(out)}")
        except Exception as exc:
            record("flex", label, dtype, False, note=short_exc(exc))

    # weight mutation after prepack: is the weight copied?
    try:
        w2 = w.clone()
        c = P.convolution_prepack(w2, b, stride, pad, dil, 1, False, list(x.shape))
        before = P.convolution_run(x, c).clone()
        w2.mul_(2.0)
        after = P.convolution_run(x, c)
        record("flex", "weight mutated after prepack", dtype, None,
               note="ctx holds its OWN copy (unaffected)" if torch.equal(before, after)
               else "ctx ALIASES the weight (output changed)")
    except Exception as exc:
        record("flex", "weight mutated after prepack", dtype, False, note=short_exc(exc))


# ----------------------------------------------------------------------------- linear

def linear_posts():
    return {
        "relu": ((), F.relu),
        "gelu[none]": (("none",), lambda y: F.gelu(y)),
        "gelu[tanh]": (("tanh",), lambda y: F.gelu(y, approximate="tanh")),
        "swish": ((), F.silu),
        "sigmoid": ((), torch.sigmoid),
        "tanh": ((), torch.tanh),
        "hardtanh(-0.5,0.75)": ((-0.5, 0.75), lambda y: F.hardtanh(y, -0.5, 0.75)),
        "elu(0.7,1,1)": ((0.7, 1.0, 1.0), lambda y: F.elu(y, 0.7)),
        "elu(0.7,1.3,0.9)": ((0.7, 1.3, 0.9), lambda y: torch.ops.aten.elu(y, 0.7, 1.3, 0.9)),
        "leaky_relu(0.1)": ((0.1,), lambda y: F.leaky_relu(y, 0.1)),
        "hardswish": ((), F.hardswish),
        "hardsigmoid": ((), F.hardsigmoid),
        "mish": ((), F.mish),
        "abs": ((), torch.abs),
        "exp": ((), torch.exp),
        "square": ((), torch.square),
        "pow(2.0)": ((2.0,), lambda y: torch.pow(y, 2.0)),
        "round": ((), torch.round),
    }


def rand_linear(dtype, m=8, k=64, n=48, seed=0, lead=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, m, k, generator=g)
    w = torch.randn(n, k, generator=g) * (1.0 / k) ** 0.5
    b = torch.randn(n, generator=g) * 0.1
    return x.to(dtype), w.to(dtype), b.to(dtype)


def probe_linear(dtype):
    print(f"\n== linear + post-op ({dtype}) : x[8,64] W[48,64] ==")
    x, w, b = rand_linear(dtype)
    y32 = F.linear(x.float(), w.float(), b.float())
    ye = F.linear(x, w, b)
    try:
        ctx = P.linear_prepack(w, b, x.shape[0])
        out = P.linear_run(x, ctx)
        ok, err, eerr = compare(out, y32, ye, dtype)
        record("linear", "(none) linear_run", dtype, ok, err, f"eager_err={eerr:.3g} out={layout(out)}")
    except Exception as exc:
        record("linear", "(none) linear_run", dtype, False, note=short_exc(exc))
        return
    for name, (args, post) in linear_posts().items():
        base = op_base(name)
        try:
            out = getattr(P, f"linear_{base}_run")(x, *args, ctx)
            ok, err, eerr = compare(out, post(y32), post(ye), dtype)
            record("linear", name, dtype, ok, err, f"eager_err={eerr:.3g} out={out.dtype}")
        except Exception as exc:
            record("linear", name, dtype, False, note=short_exc(exc))

    other = torch.randn(y32.shape, generator=torch.Generator().manual_seed(11)).to(dtype)
    for base, ref_fn in [("add", lambda y, o, a: y + a * o), ("add_relu", lambda y, o, a: F.relu(y + a * o))]:
        for alpha in (1.0, 0.5, -1.0):
            name = f"{base} alpha={alpha}"
            try:
                acc = other.clone()
                ptr = acc.data_ptr()
                out = getattr(P, f"linear_{base}_run")(x, acc, alpha=alpha, W_prepack=ctx)
                ok, err, eerr = compare(out, ref_fn(y32, other.float(), alpha), ref_fn(ye, other, alpha), dtype)
                record("linear", name, dtype, ok, err,
                       f"eager_err={eerr:.3g} returns_accumu={out.data_ptr() == ptr} "
                       f"accumu_overwritten={not torch.equal(acc, other)}")
            except Exception as exc:
                record("linear", name, dtype, False, note=short_exc(exc))
    try:
        acc = other.float().clone()
        out = P.linear_add_run(x, acc, alpha=1.0, W_prepack=ctx)
        ok, err, eerr = compare(out, y32 + other.float(), ye + other, dtype)
        record("linear", "add with fp32 accumu", dtype, ok, err, f"out={out.dtype}")
    except Exception as exc:
        record("linear", "add with fp32 accumu", dtype, False, note=short_exc(exc))
    try:
        acc = torch.randn(y32.shape[-1]).to(dtype)
        acc0 = acc.clone()
        out = P.linear_add_run(x, acc, alpha=1.0, W_prepack=ctx)
        ok, err, eerr = compare(out, y32 + acc0.float(), ye + acc0, dtype) if out.shape == y32.shape else (False, None, 0)
        record("linear", "add with broadcast accumu [N]", dtype, ok, err, f"out shape={tuple(out.shape)}")
    except Exception as exc:
        record("linear", "add with broadcast accumu [N]", dtype, False, note=short_exc(exc))
    mul = torch.randn(y32.shape, generator=torch.Generator().manual_seed(12)).to(dtype)
    try:
        out = P.linear_mul_run(x, mul, ctx)
        ok, err, eerr = compare(out, y32 * mul.float(), ye * mul, dtype)
        record("linear", "mul (linear*t)", dtype, ok, err)
        out = P.linear_mul_add_run(x, mul, other, ctx)
        ok, err, eerr = compare(out, y32 * mul.float() + other.float(), ye * mul + other, dtype)
        record("linear", "mul_add (linear*t1+t2)", dtype, ok, err)
    except Exception as exc:
        record("linear", "mul / mul_add", dtype, False, note=short_exc(exc))

    # flexibility
    g = torch.Generator().manual_seed(13)

    def check(label, xin, c, b_=b, runner=None):
        try:
            out = (runner or P.linear_relu_run)(xin, c)
            ok, err, eerr = compare(out, F.relu(F.linear(xin.float(), w.float(), None if b_ is None else b_.float())),
                                    F.relu(F.linear(xin, w, b_)), dtype)
            record("linflex", label, dtype, ok, err, f"out shape={tuple(out.shape)} {layout(out)}")
        except Exception as exc:
            record("linflex", label, dtype, False, note=short_exc(exc))

    check("M=3 (prepacked batch_size=8)", torch.randn(3, 64, generator=g).to(dtype), ctx)
    check("M=100 (prepacked batch_size=8)", torch.randn(100, 64, generator=g).to(dtype), ctx)
    check("3-D input [2,5,64]", torch.randn(2, 5, 64, generator=g).to(dtype), ctx)
    check("non-contiguous input (transposed)", torch.randn(64, 8, generator=g).to(dtype).t(), ctx)
    ctx_none = P.linear_prepack(w, b, None)
    check("batch_size=None at prepack", x, ctx_none)
    check("bias=None", x, P.linear_prepack(w, None, None), b_=None)


def probe_mkl_and_ipex_linear():
    print("\n== fp32 linear entry points (correctness) ==")
    x, w, b = rand_linear(torch.float32, m=8, k=64, n=48)
    ref = F.linear(x, w, b)
    empty_w = torch.Tensor()
    empty_b = torch.Tensor()
    lctx = P.linear_prepack(w, b, 8)
    mctx = P.mkl_sgemm_prepack(w, b, 8)
    cases = {
        "mkl_sgemm_run(x, mctx)": lambda: P.mkl_sgemm_run(x, mctx),
        "torch_ipex.ipex_MKLSGEMM(x, empty, empty, mctx.get_data_handle(), N)":
            lambda: TI.ipex_MKLSGEMM(x, empty_w, empty_b, mctx.get_data_handle(), 48),
        "torch_ipex.ipex_linear(x, empty, empty, lctx.get_data_handle(), N)":
            lambda: TI.ipex_linear(x, empty_w, empty_b, lctx.get_data_handle(), 48),
        "torch_ipex.ipex_linear(x, w, b, lctx.get_data_handle(), N)":
            lambda: TI.ipex_linear(x, w, b, lctx.get_data_handle(), 48),
        "torch_ipex.ipex_linear_eltwise(x, w, b, 1=ReLU, handle, N)":
            lambda: TI.ipex_linear_eltwise(x, w, b, 1, lctx.get_data_handle(), 48),
        "torch_ipex.ipex_linear_eltwise(x, w, b, 2=Sigmoid, handle, N)":
            lambda: TI.ipex_linear_eltwise(x, w, b, 2, lctx.get_data_handle(), 48),
        "mkl_sgemm_run with 3-D x [2,4,64]": lambda: P.mkl_sgemm_run(x.view(2, 4, 64), mctx),
        "mkl_sgemm_run with M=5": lambda: P.mkl_sgemm_run(x[:5], mctx),
    }
    refs = {
        "torch_ipex.ipex_linear_eltwise(x, w, b, 1=ReLU, handle, N)": F.relu(ref),
        "torch_ipex.ipex_linear_eltwise(x, w, b, 2=Sigmoid, handle, N)": torch.sigmoid(ref),
        "mkl_sgemm_run with 3-D x [2,4,64]": ref.view(2, 4, 48),
        "mkl_sgemm_run with M=5": ref[:5],
    }
    for label, fn in cases.items():
        try:
            with torch.inference_mode():
                out = fn()
            r = refs.get(label, ref)
            err = (out - r).abs().max().item()
            record("linfp32", label, torch.float32, err < 1e-4, err, f"shape={tuple(out.shape)}")
        except Exception as exc:
            record("linfp32", label, torch.float32, False, note=short_exc(exc))
    try:
        P.mkl_sgemm_prepack(w.bfloat16(), b.bfloat16(), 8)
        record("linfp32", "mkl_sgemm_prepack with bf16 weight", torch.bfloat16, None, note="accepted")
    except Exception as exc:
        record("linfp32", "mkl_sgemm_prepack with bf16 weight", torch.bfloat16, None, note="raises " + short_exc(exc))


# ----------------------------------------------------------------------------- integration with fx / copy

def probe_integration():
    print("\n== op-context objects: copy / pickle / torch.fx ==")
    x, w, b = rand_conv(torch.float32)
    ctx = P.convolution_relu_prepack(w, b, [1, 1], [1, 1], [1, 1], 1, False, list(x.shape))
    ref = P.convolution_relu_run(x, ctx)
    try:
        c2 = copy.deepcopy(ctx)
        record("integr", "copy.deepcopy(ctx)", None, torch.equal(P.convolution_relu_run(x, c2), ref))
    except Exception as exc:
        record("integr", "copy.deepcopy(ctx)", None, False, note=short_exc(exc))
    try:
        buf = io.BytesIO()
        torch.save(ctx, buf)
        buf.seek(0)
        c3 = torch.load(buf, weights_only=False)
        record("integr", "torch.save/torch.load(ctx)", None, torch.equal(P.convolution_relu_run(x, c3), ref))
    except Exception as exc:
        record("integr", "torch.save/torch.load(ctx)", None, False, note=short_exc(exc))

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ctx = ctx

        def forward(self, inp):
            return torch.ops.ipex_prepack.convolution_relu_run(inp, self.ctx)

    try:
        gm = torch.fx.symbolic_trace(M())
        ok = torch.equal(gm(x), ref)
        kinds = [n.op for n in gm.graph.nodes]
        record("integr", "fx.symbolic_trace(module holding ctx)", None, ok, note=f"nodes={kinds}")
        g2 = torch.fx.Graph()
        inp = g2.placeholder("x")
        gm0 = torch.nn.Module()
        gm0.c = ctx
        attr = g2.get_attr("c")
        g2.output(g2.call_function(torch.ops.ipex_prepack.convolution_relu_run.default, (inp, attr)))
        gm2 = torch.fx.GraphModule(gm0, g2)
        record("integr", "hand-built GraphModule: get_attr(ctx)+call_function(.default)", None,
               torch.equal(gm2(x), ref))
        gm3 = copy.deepcopy(gm2)
        record("integr", "deepcopy(GraphModule with ctx attr)", None, torch.equal(gm3(x), ref))
        # kwargs-only binary op as an fx node
        g4 = torch.fx.Graph()
        xi, oi = g4.placeholder("x"), g4.placeholder("other")
        c4 = g4.get_attr("c")
        g4.output(g4.call_function(torch.ops.ipex_prepack.convolution_add_run.default, (xi, oi),
                                   {"alpha": 1.0, "W_prepack": c4}))
        gm4 = torch.fx.GraphModule(gm0, g4)
        y = torch.nn.functional.conv2d(x, w, b, 1, 1)
        other = torch.randn(y.shape)
        out = gm4(x, other.clone())
        record("integr", "fx call_function(convolution_add_run.default, kwargs alpha/W_prepack)", None,
               torch.allclose(out, y + other, atol=1e-4))
        h = ctx.get_data_handle()
        record("integr", "ctx.get_data_handle()", None, None,
               note=f"{type(h).__name__} dtype={h.dtype} shape={tuple(h.shape)}")
    except Exception as exc:
        record("integr", "torch.fx with ctx", None, False, note=short_exc(exc))
    try:
        x.requires_grad_(True)
        out = P.convolution_relu_run(x, ctx)
        record("integr", "input.requires_grad=True (grad mode on)", None, None,
               note=f"runs; out.requires_grad={out.requires_grad} grad_fn={type(out.grad_fn).__name__}")
    except Exception as exc:
        record("integr", "input.requires_grad=True", None, None, note="raises " + short_exc(exc))


# ----------------------------------------------------------------------------- timing

def median_ms(fn, iters, warmup=10):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def time_conv_prepack(iters):
    print(f"\n== conv prepack / run cost (threads={torch.get_num_threads()}) ==")
    shapes = [
        ("RN50 layer3 3x3 256->256 @14x14 bs1", 1, 256, 256, 14),
        ("RN50 layer1 3x3 64->64 @56x56 bs1", 1, 64, 64, 56),
        ("RN50 layer4 3x3 512->512 @7x7 bs1", 1, 512, 512, 7),
    ]
    for label, n, cin, cout, hw in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(n, cin, hw, hw, generator=g).to(dtype)
            w = (torch.randn(cout, cin, 3, 3, generator=g) * 0.02).to(dtype)
            b = torch.randn(cout, generator=g).to(dtype)
            xcl = x.to(memory_format=torch.channels_last)
            try:
                pre = []
                for i in range(12):
                    t0 = time.perf_counter()
                    c = P.convolution_relu_prepack(w, b, [1, 1], [1, 1], [1, 1], 1, False, list(x.shape))
                    pre.append((time.perf_counter() - t0) * 1e3)
                first, pre_med = pre[0], statistics.median(pre[2:])
                pre_e = []
                for i in range(5):
                    t0 = time.perf_counter()
                    P.convolution_relu_prepack(w, b, [1, 1], [1, 1], [1, 1], 1, False, [])
                    pre_e.append((time.perf_counter() - t0) * 1e3)
                c_cl = P.convolution_relu_prepack(w, b, [1, 1], [1, 1], [1, 1], 1, True, list(x.shape))
                with torch.inference_mode():
                    t_ipex = median_ms(lambda: P.convolution_relu_run(x, c), iters)
                    t_ipex_cl = median_ms(lambda: P.convolution_relu_run(xcl, c_cl), iters)
                    t_eager = median_ms(lambda: F.relu(F.conv2d(x, w, b, 1, 1)), iters)
                    wcl = w.to(memory_format=torch.channels_last)
                    t_eager_cl = median_ms(lambda: F.relu(F.conv2d(xcl, wcl, b, 1, 1)), iters)
                record("time", f"{label}", dtype, None,
                       note=(f"prepack first={first:.2f}ms median={pre_med:.2f}ms (input_sizes=[]: "
                             f"{statistics.median(pre_e):.2f}ms) | run conv+relu: ipex={t_ipex:.3f}ms "
                             f"ipex_cl={t_ipex_cl:.3f}ms eager={t_eager:.3f}ms eager_cl={t_eager_cl:.3f}ms"))
            except Exception as exc:
                record("time", label, dtype, False, note=short_exc(exc))


def time_linear(iters):
    print(f"\n== fp32 linear [8,768] x [768,3072] timing, {iters} iters, median (threads={torch.get_num_threads()}) ==")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 768, generator=g)
    w = torch.randn(3072, 768, generator=g) * 0.03
    b = torch.randn(3072, generator=g)
    e = torch.Tensor()
    t0 = time.perf_counter()
    lctx = P.linear_prepack(w, b, 8)
    t_lp = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    mctx = P.mkl_sgemm_prepack(w, b, 8)
    t_mp = (time.perf_counter() - t0) * 1e3
    record("time", "linear prepack cost", torch.float32, None,
           note=f"linear_prepack={t_lp:.2f}ms mkl_sgemm_prepack={t_mp:.2f}ms")
    lh, mh = lctx.get_data_handle(), mctx.get_data_handle()
    ref = F.linear(x, w, b)
    cands = {
        "eager F.linear (torch 2.8 aten addmm/MKL)": lambda: F.linear(x, w, b),
        "ipex_prepack.mkl_sgemm_run(x, mctx)": lambda: P.mkl_sgemm_run(x, mctx),
        "torch_ipex.ipex_MKLSGEMM(x, e, e, mctx handle, 3072)": lambda: TI.ipex_MKLSGEMM(x, e, e, mh, 3072),
        "ipex_prepack.linear_run(x, lctx) [oneDNN]": lambda: P.linear_run(x, lctx),
        "torch_ipex.ipex_linear(x, e, e, lctx handle, 3072) [oneDNN]": lambda: TI.ipex_linear(x, e, e, lh, 3072),
        "eager F.gelu(F.linear)":
            lambda: F.gelu(F.linear(x, w, b)),
        "ipex_prepack.linear_gelu_run(x,'none',lctx)": lambda: P.linear_gelu_run(x, "none", lctx),
        "F.gelu(mkl_sgemm_run(x, mctx))": lambda: F.gelu(P.mkl_sgemm_run(x, mctx)),
        "F.relu(F.linear)": lambda: F.relu(F.linear(x, w, b)),
        "ipex_prepack.linear_relu_run(x,lctx)": lambda: P.linear_relu_run(x, lctx),
    }
    with torch.inference_mode():
        for label, fn in cands.items():
            try:
                out = fn()
                t = median_ms(fn, iters, warmup=20)
                gf = 2 * 8 * 768 * 3072 / (t * 1e-3) / 1e9
                r = ref if "gelu" not in label and "relu" not in label else None
                err = None if r is None else (out - r).abs().max().item()
                record("time", label, torch.float32, None, err, note=f"median={t * 1e3:.1f}us ({gf:.0f} GFLOP/s)")
            except Exception as exc:
                record("time", label, torch.float32, False, note=short_exc(exc))
    # bf16 for reference
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    lctxb = P.linear_prepack(wb, bb, 8)
    with torch.inference_mode():
        for label, fn in {
            "bf16 eager F.linear": lambda: F.linear(xb, wb, bb),
            "bf16 ipex_prepack.linear_run": lambda: P.linear_run(xb, lctxb),
            "bf16 ipex_prepack.linear_gelu_run": lambda: P.linear_gelu_run(xb, "none", lctxb),
            "bf16 eager F.gelu(F.linear)": lambda: F.gelu(F.linear(xb, wb, bb)),
        }.items():
            t = median_ms(fn, iters, warmup=20)
            record("time", label, torch.bfloat16, None, note=f"median={t * 1e3:.1f}us")


# ----------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="skip timings")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--json", help="write raw records to this file")
    args = ap.parse_args()

    torch.manual_seed(0)
    print(f"torch {torch.__version__}  ipex {ipex.__version__}  threads {torch.get_num_threads()}  "
          f"isa {torch.backends.cpu.get_cpu_capability()}")
    for dtype in (torch.float32, torch.bfloat16):
        probe_conv_posts(dtype)
        probe_conv_add(dtype)
        probe_conv_flex(dtype)
        probe_linear(dtype)
    probe_mkl_and_ipex_linear()
    probe_integration()
    if not args.quick:
        time_conv_prepack(max(20, args.iters // 4))
        time_linear(args.iters)

    fails = [r for r in RECORDS if r["ok"] is False]
    known = [r for r in fails if r["name"] in KNOWN_LIMITATIONS]
    unexpected = [r for r in fails if r["name"] not in KNOWN_LIMITATIONS]
    print(f"\n{len(RECORDS)} records, {sum(r['ok'] is True for r in RECORDS)} OK, "
          f"{len(known)} FAIL (known limitation), {len(unexpected)} FAIL (unexpected), "
          f"{sum(r['ok'] is None for r in RECORDS)} INFO")
    for r in known:
        print(f"  known-limitation {r['section']} {r['name']} {r['dtype']}: {r['note']}")
    for r in unexpected:
        print(f"  UNEXPECTED FAIL {r['section']} {r['name']} {r['dtype']}: {r['note']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(RECORDS, fh, indent=1)
    return 1 if unexpected else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(2)
