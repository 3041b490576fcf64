"""In-place accumulation (oneDNN's sum post-op, ``mkldnn._convolution_pointwise_.binary``):
chosen only when ``other`` is dead after the op and is no graph input/output, constant,
alias of anything live or operand of the op; otherwise the out-of-place kernel, and the
report says which form and why. Expected values come from eager PyTorch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fusepass.capture import capture, lift_module
from fusepass.ir import alias
from tests.util import NATIVE_BF16, assert_close, examples, histogram, optimize

INPLACE = "mkldnn._convolution_pointwise_.binary"
OUT_OF_PLACE = "mkldnn._convolution_pointwise.binary"


# The layout pass may insert copies (NCHW exits) that end a residual's life before the
# add, so the form assertions run without it; numerics are checked both ways.
NO_LAYOUT = {"disable": ["propagate_layout"]}


def binary_lowerings(report) -> list:
    return [d for d in report.where(stage="lower", action="lowered") if ".binary" in d.rule]


class Net(torch.nn.Module):
    """Two convs of x; ``fn(self, x, t, y=conv_a(x), r=conv_b(x))`` builds the rest."""

    def __init__(self, fn, c=6):
        super().__init__()
        self.a = torch.nn.Conv2d(4, c, 3, padding=1)
        self.b = torch.nn.Conv2d(4, c, 1)
        self.c1 = torch.nn.Conv2d(c, c, 1)  # c -> c: x may be its own residual
        self.register_buffer("const", torch.randn(2, c, 5, 5))
        self.fn = fn

    def forward(self, x, t):
        return self.fn(self, x, t)


CASES = {
    # name: (fn, form, reason in the report)
    "dead residual": (lambda s, x, t: F.relu(s.a(x) + s.b(x)), INPLACE, "in place into"),
    "residual read again after the add": (
        lambda s, x, t: (lambda r: F.relu(s.a(x) + r) * r)(s.b(x)),
        OUT_OF_PLACE, "read again after the op"),
    "residual is a graph input": (lambda s, x, t: F.relu(s.a(x) + t), OUT_OF_PLACE,
                                  "other is a graph input"),
    "residual is a graph output": (lambda s, x, t: (lambda r: (F.relu(s.a(x) + r), r))(s.b(x)),
                                   OUT_OF_PLACE, "is a graph output"),
    "residual is a constant": (lambda s, x, t: s.a(x) + s.const, OUT_OF_PLACE,
                               "other is a constant"),
    "residual is a view of a live tensor": (
        lambda s, x, t: (lambda r: (s.a(x) + r.view(r.shape)) * r)(s.b(x)),
        OUT_OF_PLACE, "read again after the op"),
    "residual is a view of a dead tensor": (
        lambda s, x, t: s.a(x) + s.b(x).view(2, 6, 5, 5), INPLACE, "in place into"),
    "residual is an expanded view": (
        lambda s, x, t: s.a(x) + s.b(x).mean((2, 3), keepdim=True).expand(2, 6, 5, 5),
        OUT_OF_PLACE, "differ from the result's"),
    "residual is a view of a graph input": (
        lambda s, x, t: s.a(x) + t.view(2, 6, 5, 5), OUT_OF_PLACE, "is a graph input"),
    "residual is the conv's own input": (
        lambda s, x, t: (lambda u: F.relu(s.c1(u) + u))(torch.sin(s.b(x))),
        OUT_OF_PLACE, "also an operand the op reads"),
    "residual read later through a view": (
        lambda s, x, t: (lambda r: (s.a(x) + r, r[:, :3].sum()))(s.b(x)),
        OUT_OF_PLACE, "read again after the op"),
    "sub never accumulates in place": (lambda s, x, t: s.a(x) - s.b(x), OUT_OF_PLACE,
                                       "only add accumulates in place"),
}


@pytest.mark.parametrize("name", CASES)
def test_inplace_form_and_reason(name):
    fn, form, reason = CASES[name]
    torch.manual_seed(0)
    m = Net(fn).eval()
    x, t = torch.randn(2, 4, 5, 5), torch.randn(2, 6, 5, 5)
    x0, t0 = x.clone(), t.clone()
    gm = optimize(m, [x, t], **NO_LAYOUT)
    assert not gm.fusepass_report.fell_back, gm.fusepass_report.summary()
    lowered = binary_lowerings(gm.fusepass_report)
    assert len(lowered) == 1, gm.fusepass_report
    assert lowered[0].rule == form and reason in lowered[0].reason, lowered[0]
    assert histogram(gm)[form] == 1
    with_layout = optimize(m, [x, t])
    with torch.no_grad():
        want = m(x, t)
        for _ in range(2):  # a second call must not see state left by the first
            assert_close(gm(x, t), want)
            assert_close(with_layout(x, t), want)
    assert torch.equal(x, x0) and torch.equal(t, t0), "a graph input was written"


def test_a_chain_of_residual_blocks_accumulates_in_place():
    """ResNet's identity blocks: each block's output is the next block's residual."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = torch.nn.Conv2d(8, 8, 1), torch.nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return F.relu(self.c2(F.relu(self.c1(x))) + x)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.blocks = torch.nn.Sequential(Block(), Block(), Block())

        def forward(self, x):
            return self.blocks(F.relu(self.stem(x))).mean((2, 3))

    torch.manual_seed(0)
    m, x = M().eval(), torch.randn(2, 3, 8, 8)
    gm = optimize(m, [x])
    assert [d.rule for d in binary_lowerings(gm.fusepass_report)] == [INPLACE] * 3
    for variant in (x, x.to(memory_format=torch.channels_last)):
        with torch.no_grad():
            assert_close(gm(variant), m(variant))
    with torch.no_grad():
        assert_close(gm(x), m(x))


@pytest.mark.parametrize("channels_last,dtype", [
    pytest.param(False, torch.float32, id="nchw-fp32"),
    pytest.param(True, torch.float32, id="nhwc-fp32"),
    # with native bf16 the add+relu chain is split at lowering (a layout only lowering sees);
    # without, bf16 is declined before fusion
    pytest.param(False, torch.bfloat16, id="nchw-bf16", marks=[pytest.mark.expect_kept(
        r"^lower: .*bf16 add\+relu on a non-channels-last or grouped conv: .*no bf16 kernel")]
        if NATIVE_BF16 else []),
    pytest.param(True, torch.bfloat16, id="nhwc-bf16"),
])
def test_layouts_and_bf16(channels_last, dtype):
    """bf16 add+relu off oneDNN's channels-last path would hit add_relu_ (no bf16 kernel):
    that case stays on the reference kernel, and says so."""
    torch.manual_seed(0)
    m = Net(CASES["dead residual"][0]).eval().to(dtype)
    x, t = torch.randn(2, 4, 5, 5, dtype=dtype), torch.randn(2, 6, 5, 5, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    gm = optimize(m, [x, t], **NO_LAYOUT)
    rep = gm.fusepass_report
    if dtype == torch.bfloat16 and not NATIVE_BF16:
        assert rep.counts == {} and rep.kernels == {}, rep
        assert any("CPU lacks native bf16" in d.reason for d in rep.declined), rep
    elif dtype == torch.bfloat16 and not channels_last:
        kept = [d for d in rep.where(stage="lower", action="kept")]
        assert kept and "no bf16 kernel" in kept[0].reason, rep
    else:
        assert [d.rule for d in binary_lowerings(rep)] == [INPLACE], rep
    with torch.no_grad():
        assert_close(gm(x, t), m(x, t), dtype)


def test_residual_with_another_layout_is_written_out_of_place():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.Conv2d(4, 6, 1)

        def forward(self, x):
            r = self.b(x.contiguous())  # contiguous residual, channels-last conv output
            return self.a(x) + r.contiguous()

    torch.manual_seed(0)
    m = M().eval()
    x = torch.randn(2, 4, 5, 5).to(memory_format=torch.channels_last)
    gm = optimize(m, [x])
    with torch.no_grad():
        assert_close(gm(x), m(x))
        assert gm(x).stride() == m(x).stride()


# --- the analysis itself, on captured graphs -------------------------------------------

def _captured(fn, *args):
    class W(torch.nn.Module):
        def forward(self, a):
            return fn(a)

    lifted, weights = lift_module(torch.fx.symbolic_trace(W()))
    return capture(lifted, weights() + list(args), freeze=True).gm


def _node(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name)


def test_alias_class_follows_views_and_splits():
    gm = _captured(lambda a: (lambda b: (b.view(-1), torch.split(b, 2, 1)[0], b * 2))(a.sin()),
                   torch.randn(2, 4))
    sin = _node(gm, "sin")
    names = {n.name for n in alias.alias_class(sin)}
    assert {"sin", "view"} <= names and "mul" not in names
    assert any(n.startswith(("split", "getitem")) for n in names)
    view = _node(gm, "view")
    assert sin in alias.alias_class(view)


@settings(max_examples=examples(20))
@given(st.integers(1, 3), st.sampled_from([1, 2]), st.booleans(), st.booleans(),
       st.booleans(), st.integers(0, 2**16))
def test_random_residual_blocks_match_eager(batch, groups, reuse, channels_last, layout, seed):
    """Drawn residual nets where the residual is sometimes read again after the add."""
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(4, 8, 3, padding=1, groups=groups)
            self.b = torch.nn.Conv2d(4, 8, 1)

        def forward(self, x):
            r = self.b(x)
            y = F.relu(self.a(x) + r)
            return y * r if reuse else y

    torch.manual_seed(seed)
    m, x = M().eval(), torch.randn(batch, 4, 6, 6)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    gm = optimize(m, [x], **({} if layout else NO_LAYOUT))
    forms = [d.rule for d in binary_lowerings(gm.fusepass_report)]
    if not layout:
        assert forms == [OUT_OF_PLACE if reuse else INPLACE]
    with torch.no_grad():
        assert_close(gm(x), m(x))
