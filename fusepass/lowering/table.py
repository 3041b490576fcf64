"""The lowering table: (target, fused op, chain shape) -> an entry with the dtypes it
takes, a pure check and a builder.

Two askers, one answer: the fuse pass's ``lowerable`` guard asks before it fuses
(``why_not`` on the form the row would make) and lowering asks before it emits. So a
row fuses only what the chosen target has a kernel for, and a fused op is never left
on the reference kernel because nobody asked.

A chain shape names the kinds of the post-ops in order: ``()``, ``("unary",)``,
``("binary",)``, ``("binary", "unary")``, ``("unary", "binary")``. Which post-op may sit
where comes from the registry (``fusepass/postops.py``: ``Kernel.families``,
``after_binary``, ``before_binary``); what else a kernel needs (ranks, shapes) from the
entry's check. The CPU's capabilities are asked here too: oneDNN's bf16 kernels need
avx512bw/vl/dq or avx_ne_convert, and on a CPU without them bf16 is declined with that
reason instead of raising inside the kernel on the first call.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from fusepass import ops as fp
from fusepass.postops import REGISTRY


@dataclass(frozen=True)
class Form:
    """What a kernel choice depends on, as fake values: a fused node, or the one a
    pattern row would make."""
    op: Any  # fp.conv / fp.linear / fp.qconv / fp.qlinear
    x: Any
    weight: Any
    bias: Any
    other: Any
    post: tuple
    scalars: tuple
    out: Any  # the fused op's result
    transposed: bool = False
    groups: int = 1

    @property
    def family(self) -> str:
        return fp.family_of(self.op)

    @property
    def dtype(self):
        return getattr(self.x, "dtype", None)

    @classmethod
    def of_node(cls, node) -> "Form":
        v = lambda a: a.meta.get("val") if isinstance(a, torch.fx.Node) else a  # noqa: E731
        other, post, scalars = fp.chain_of(node)
        x, w, b = (v(a) for a in node.args[:3])
        conv = node.target in fp.CONV_OPS
        return cls(node.target, x, w, b, v(other), tuple(post), tuple(scalars),
                   node.meta.get("val"), bool(node.args[6]) if conv else False,
                   node.args[8] if conv else 1)


@dataclass(frozen=True)
class Entry:
    dtypes: tuple
    check: Callable[[Form], Optional[str]]  # pure: why this kernel cannot take the form
    build: Callable  # (gm, node) -> (kernel name, new node); only after check said None
    # what only lowering can check (the layouts propagate_layout decides after fusion)
    late_check: Optional[Callable[[Form], Optional[str]]] = None


TABLE: dict = {}  # (target, fused op, chain shape) -> Entry


def register(target: str, op, shapes, dtypes, check, build, late_check=None):
    for shape in shapes:
        key = (target, op, tuple(shape))
        if key in TABLE:
            raise ValueError(f"duplicate lowering {key}")
        TABLE[key] = Entry(tuple(dtypes), check, build, late_check)


@functools.cache
def native_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


NO_BF16 = ("CPU lacks native bf16 (oneDNN's bf16 kernels need avx512bw/vl/dq or "
           "avx_ne_convert)")


def chain_shape(post) -> tuple:
    return tuple("binary" if REGISTRY[p].binary else "unary" for p in post)


def _position_reason(target, family, post) -> Optional[str]:
    for name in post:
        if REGISTRY[name].kernel(target, family) is None:
            return f"{target} has no {family}+{name} post-op"
    if len(post) == 2:
        first, second = REGISTRY[post[0]], REGISTRY[post[1]]
        if first.binary and not second.binary and family not in second.kernels[target].after_binary:
            return f"{target} has no {family} kernel applying {post[1]} after {post[0]}"
        if second.binary and not first.binary and family not in first.kernels[target].before_binary:
            return f"{target} has no {family} kernel applying {post[1]} after {post[0]}"
    return None


def entry(target: str, form: Form, late: bool = False) -> tuple[Optional[Entry], Optional[str]]:
    """(entry, None) when ``target`` has a kernel for ``form``, else (None, reason).
    ``late``: also the checks only lowering can make (layouts)."""
    post = list(form.post)
    if any(p not in REGISTRY for p in post):
        return None, f"unknown post-op in {post}"
    reason = _position_reason(target, form.family, post)
    if reason:
        return None, reason
    e = TABLE.get((target, form.op, chain_shape(post)))
    if e is None:
        return None, f"no {target} {form.family} kernel takes post-op chain {post}"
    if form.dtype not in e.dtypes:
        return None, f"no {target} {form.family} kernel for dtype {form.dtype}"
    if form.dtype == torch.bfloat16 and not native_bf16():
        return None, f"{target}: {NO_BF16}"
    for name, s in zip(post, _scalars_of(post, form.scalars)):
        k = REGISTRY[name].kernel(target, form.family)
        got = k.scalars(s)
        if isinstance(got, str):
            return None, got
        if any(isinstance(v, float) and v != v for v in got):
            return None, f"post-op parameters {got} are not numbers"
    reason = e.check(form) or (late and e.late_check is not None and e.late_check(form)) or None
    return (None, reason) if reason else (e, None)


def why_not(target: str, form: Form) -> Optional[str]:
    return entry(target, form)[1]


def _scalars_of(post, scalars):
    out, i = [], 0
    for name in post:
        n = REGISTRY[name].arity
        out.append(list(scalars[i:i + n]))
        i += n
    return out
