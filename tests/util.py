"""Helpers for tests: tolerances per dtype, op histograms, running the pipeline."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import settings

import fusepass
from fusepass.check import TOLERANCE

# What the CPU runs natively decides which kernels exist: oneDNN's bf16 kernels need
# avx512bw/vl/dq or avx_ne_convert (an AVX2-only Zen 3 has neither). A test that needs
# them asks with this mark, and says why when it skips.
NATIVE_BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
NO_NATIVE_BF16 = ("CPU lacks native bf16 (oneDNN's bf16 kernels need avx512bw/vl/dq or "
                  "avx_ne_convert)")
needs_native_bf16 = pytest.mark.skipif(not NATIVE_BF16, reason=NO_NATIVE_BF16)


# Decisions a test has checked and expects, one example at a time, where a marker (per
# test, static) cannot say it: a hypothesis draw that leads to a watched decision only on
# some CPUs. tests/conftest.py's watch skips them and clears the list after each test.
EXPECTED_DECISIONS: list = []


def expect_decisions(decisions) -> None:
    """The watch (tests/conftest.py) lets these exact Decision objects through: call it
    only after asserting what they say."""
    EXPECTED_DECISIONS.extend(decisions)


def require_native_bf16():
    """Skip the calling test, saying why, on a CPU without native bf16 (the call form of
    ``needs_native_bf16``, for a test that decides inside)."""
    if not NATIVE_BF16:
        pytest.skip(NO_NATIVE_BF16)

TOL = TOLERANCE  # fusepass.check's table: one tolerance per dtype for check mode and tests


def examples(n: int) -> int:
    """Scale an example count with the active hypothesis profile."""
    scale = {"dev": 0.25, "ci": 1, "thorough": 10}.get(settings._current_profile, 1)
    return max(2, int(n * scale))


def assert_close(got, want, dtype=None, scale_by_output=True):
    for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        dtype_ = dtype or w.dtype
        rtol, atol = TOL.get(dtype_, (1e-5, 1e-5))
        scale = max(w.float().abs().max().item(), 1.0) if scale_by_output and w.numel() else 1.0
        torch.testing.assert_close(g.float(), w.float(), rtol=rtol, atol=atol * scale)


def histogram(gm, exact: bool = False) -> Counter:
    """Counter of call_function targets by short name: {"mkldnn._convolution_pointwise": 2}.
    An elementwise op that ``inplace_pointwise`` made in place counts under its
    functional name ("aten.add_" as "aten.add": which ops a graph runs, not where their
    results live) unless ``exact``."""
    from fusepass.passes.inplace_pointwise import TABLE
    functional = {inplace: op for op, (inplace, _) in TABLE.items()}
    c = Counter()
    for n in gm.graph.nodes:
        if n.op == "call_function":
            target = n.target if exact else functional.get(n.target, n.target)
            c[short(target)] += 1
    return c


def short(target) -> str:
    """"aten.mul" (aten overloads dropped), "mkldnn._convolution_pointwise.binary"
    (other namespaces keep a non-default overload), "fusepass.conv"."""
    schema = getattr(target, "_schema", None)
    if schema is None:
        return getattr(target, "__name__", str(target))
    ns, _, op = schema.name.partition("::")
    overload = schema.overload_name
    keep = overload and overload != "default" and ns != "aten"
    return f"{ns}.{op}" + (f".{overload}" if keep else "")


def optimize(fn, inputs, **opts):
    """optimize an nn.Module or function via symbolic_trace, under no_grad."""
    if not isinstance(fn, torch.nn.Module):
        fn = _Wrap(fn)
    gm = torch.fx.symbolic_trace(fn)
    with torch.no_grad():
        return fusepass.optimize(gm, list(inputs), **opts)


class _Wrap(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def tiny_bert(layers: int = 1):
    """A small BertModel from a config (no download), its Linears re-initialized (HF's
    std-0.02 init shrinks every activation), in eval mode."""
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    bert = T.BertModel(T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers,
                                    num_attention_heads=2, intermediate_size=64)).eval()
    for mod in bert.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.reset_parameters()
    return bert
