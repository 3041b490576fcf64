"""Every conv/linear epilogue row: matches once on its own example, the op histogram
before/after is what the row says, numerics match eager (hypothesis, every row in every
run), negatives decline. Rows the onednn target has no kernel for decline there with the
reason, and fuse on the reference target (the pattern itself is right)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fusepass.patterns import epilogues
from tests.util import NATIVE_BF16, assert_close, examples, histogram, optimize

# spelling -> (eager function of y, the ATen op names it leaves in an unfused graph)
EAGER = {
    "relu": (F.relu, {"aten.relu"}),
    "silu": (F.silu, {"aten.silu"}),
    "silu_mul": (lambda y: y * torch.sigmoid(y), {"aten.mul", "aten.sigmoid"}),
    "sigmoid": (torch.sigmoid, {"aten.sigmoid"}),
    "tanh": (torch.tanh, {"aten.tanh"}),
    "gelu": (F.gelu, {"aten.gelu"}),
    "gelu_tanh": (lambda y: F.gelu(y, approximate="tanh"), {"aten.gelu"}),
    "hardtanh": (F.relu6, {"aten.hardtanh"}),
    "clamp": (lambda y: torch.clamp(y, -0.5, 0.75), {"aten.clamp"}),
    "clamp_min": (lambda y: torch.clamp_min(y, 0.25), {"aten.clamp_min"}),
    "clamp_max": (lambda y: torch.clamp_max(y, -0.25), {"aten.clamp_max"}),
    "leaky_relu": (lambda y: F.leaky_relu(y, 0.2), {"aten.leaky_relu"}),
    "elu": (lambda y: F.elu(y, 1.3), {"aten.elu"}),
    "hardswish": (F.hardswish, {"aten.hardswish"}),
    "hardsigmoid": (F.hardsigmoid, {"aten.hardsigmoid"}),
}
# measured on torch 2.13: stock oneDNN has no elu post-op ("Fusion behavior undefined")
NO_ONEDNN = {"elu"}
ROWS = epilogues.ROWS
CONV_ROWS = [r for r in ROWS if r.name.startswith("conv")]
LINEAR_ROWS = [r for r in ROWS if r.name.startswith("linear")]


def test_every_row_has_an_eager_case():
    """A row without an eager case would go untested: adding a post-op means adding it here."""
    assert {r.name.split(".")[1] for r in ROWS} <= set(EAGER), ROWS
    assert {f"{f}.{s}" for f in epilogues.FAMILIES for s in EAGER} == {r.name for r in ROWS}


class Block(torch.nn.Module):
    def __init__(self, family, spelling, cin=4, cout=6, groups=1, k=3, stride=1, padding=1,
                 dilation=1, bias=True):
        super().__init__()
        if family == "linear":
            self.op = torch.nn.Linear(cin, cout, bias=bias)
        else:
            conv = {"conv1d": torch.nn.Conv1d, "conv2d": torch.nn.Conv2d, "conv3d": torch.nn.Conv3d}[family]
            self.op = conv(cin, cout, k, stride, padding, dilation, groups, bias)
        self.post = EAGER[spelling][0]

    def forward(self, x):
        return self.post(self.op(x))


def example(family, batch=2, cin=4, size=7):
    depth = min(size, 5)
    shape = {"conv1d": (batch, cin, size), "conv2d": (batch, cin, size, size),
             "conv3d": (batch, cin, depth, size, size), "linear": (batch, 5, cin)}[family]
    return torch.randn(shape)


def expect_fused(rep, row, spelling, dtype, want=None):
    """The row fused once, or declined for the one reason this CPU/target gives; a conv
    whose eager output (``want``) is laid out otherwise than oneDNN's conv writes it (a
    3-d conv fed channels-last, say) declines naming eager's strides."""
    kind = "linear" if row.name.startswith("linear") else "conv"
    layout = [d for d in rep.where(rule=row.name, action="declined") if "oneDNN's conv writes" in d.reason]
    if layout and want is not None:
        assert f"eager gives strides {tuple(want.stride())}" in layout[0].reason, rep
        return False
    if spelling in NO_ONEDNN:
        reason = f"onednn has no {kind}+{spelling} post-op"
    elif dtype == torch.bfloat16 and not NATIVE_BF16:
        reason = "CPU lacks native bf16"
    else:
        assert rep.counts == {row.name: 1}, rep
        return True
    assert rep.counts == {}, rep
    assert any(reason in d.reason for d in rep.where(rule=row.name, action="declined")), rep
    return False


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_row_matches_once_histogram_and_numerics(row):
    family, spelling = row.name.split(".")
    torch.manual_seed(0)
    m = Block(family, spelling).eval()
    x = example(family)
    unfused = optimize(m, [x], disable=["fuse"])
    gm = optimize(m, [x])
    before, after = histogram(unfused), histogram(gm)
    kernel = "mkldnn._linear_pointwise" if family == "linear" else "mkldnn._convolution_pointwise"
    if expect_fused(gm.fusepass_report, row, spelling, torch.float32):
        for op in EAGER[spelling][1]:
            assert before[op] >= 1 and after[op] == 0, (op, before, after)
        assert after[kernel] == 1 and after[kernel] == before[kernel]
    else:  # declined: the graph is the unfused one, the conv still on oneDNN
        assert after == before and after[kernel] == 1, (before, after)
    ref = optimize(m, [x], lowering="reference")  # the pattern matches on any target
    assert ref.fusepass_report.counts == {row.name: 1}
    with torch.no_grad():
        assert_close(gm(x), m(x))
        assert_close(ref(x), m(x))


@st.composite
def conv_shape(draw, family):
    depthwise = draw(st.booleans())
    groups = 4 if depthwise else draw(st.sampled_from([1, 2, 4]))
    cout = 4 if depthwise else draw(st.sampled_from([4, 8]))
    k = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.integers(0, 2))
    batch = draw(st.integers(1, 3))
    size = draw(st.integers(dilation * (k - 1) + 1, 9))  # conv3d depth: min(size, 5) >= it
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    channels_last = family != "conv1d" and draw(st.booleans())
    bias = draw(st.booleans())
    return dict(cin=4, cout=cout, groups=groups, k=k, stride=stride, padding=padding,
                dilation=dilation, bias=bias), batch, size, dtype, channels_last


@pytest.mark.parametrize("row", CONV_ROWS, ids=lambda r: r.name)
@settings(max_examples=examples(5))
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_conv_rows_numerics_vs_eager(row, data, seed):
    family, spelling = row.name.split(".")
    kw, batch, size, dtype, channels_last = data.draw(conv_shape(family))
    torch.manual_seed(seed)
    m = Block(family, spelling, **kw).eval().to(dtype)
    x = example(family, batch, kw["cin"], size).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    gm = optimize(m, [x])
    with torch.no_grad():
        want = m(x)
        got = gm(x)
    expect_fused(gm.fusepass_report, row, spelling, dtype, want)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert_close(got, want, dtype)


@pytest.mark.parametrize("row", LINEAR_ROWS, ids=lambda r: r.name)
@settings(max_examples=examples(4))
@given(st.integers(1, 4), st.integers(1, 16), st.integers(1, 16), st.booleans(),
       st.sampled_from([torch.float32, torch.bfloat16]), st.integers(0, 2**16))
def test_linear_rows_numerics_vs_eager(row, batch, cin, cout, bias, dtype, seed):
    torch.manual_seed(seed)
    spelling = row.name.split(".")[1]
    m = Block("linear", spelling, cin=cin, cout=cout, bias=bias).eval().to(dtype)
    x = torch.randn(batch, 3, cin).to(dtype)
    gm = optimize(m, [x])
    expect_fused(gm.fusepass_report, row, spelling, dtype)
    with torch.no_grad():
        assert_close(gm(x), m(x), dtype)


# --- negative cases: the graph keeps its eltwise op, the report says why ---------------

class TwoUsers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return F.relu(y) + y


class ConvOutputIsOutput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y, torch.sigmoid(y)


@pytest.mark.parametrize("model,reason", [
    (TwoUsers(), "has 2 users"),
    (ConvOutputIsOutput(), "is a graph output"),
])
def test_intermediate_with_other_users_is_declined(model, reason):
    x = torch.randn(1, 3, 8, 8)
    gm = optimize(model.eval(), [x])
    assert gm.fusepass_report.counts == {}
    declined = gm.fusepass_report.where(stage="fuse", action="declined")
    assert declined and all(reason in d.reason for d in declined), declined
    with torch.no_grad():
        assert_close(gm(x), model(x))


def test_float64_is_declined_and_still_correct():
    m = Block("conv2d", "relu").eval().double()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    gm = optimize(m, [x])
    assert gm.fusepass_report.counts == {}
    assert any("float64" in d.reason for d in gm.fusepass_report.declined)
    assert histogram(gm)["aten.relu"] == 1
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x))


@pytest.mark.parametrize("fn,reason", [
    (lambda y: torch.clamp(y, 1.0, -1.0), "min > max"),
])
def test_unsupported_post_op_parameters_are_declined(fn, reason):
    m = Block("conv2d", "relu").eval()
    m.post = fn
    x = torch.randn(1, 4, 7, 7)
    gm = optimize(m, [x])
    assert gm.fusepass_report.counts == {}
    assert any(reason in d.reason for d in gm.fusepass_report.declined), gm.fusepass_report
    with torch.no_grad():
        assert_close(gm(x), m(x))


@pytest.mark.parametrize("fn", [lambda y: torch.clamp(y, min=0.5), lambda y: y.clamp(max=-0.5),
                                lambda y: torch.clamp(y, -math.inf, 0.5)],
                         ids=["min_only", "max_only", "infinite_min"])
@pytest.mark.parametrize("family", ["conv2d", "linear"])
def test_one_sided_clamp_is_hardtanh_with_an_infinite_bound(fn, family):
    """clamp with one bound fuses (oneDNN's hardtanh takes an infinite bound, measured),
    where it used to be declined as "clamp without both bounds"."""
    m = Block(family, "relu").eval()
    m.post = fn
    x = example(family)
    gm = optimize(m, [x])
    assert gm.fusepass_report.counts == {f"{family}.clamp": 1}, gm.fusepass_report
    assert "aten.clamp" not in histogram(gm)
    with torch.no_grad():
        assert_close(gm(x), m(x))


def test_a_nan_bound_is_no_hardtanh():
    from fusepass.postops import REGISTRY
    check = REGISTRY["hardtanh"].check
    assert "not numbers" in check([math.nan, 1.0]) and "min > max" in check([1.0, -math.inf])
    assert check([-math.inf, 0.5]) is None


def test_sigmoid_times_input_in_either_order_is_silu():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.a(x)
            y = torch.sigmoid(y) * y
            z = self.b(y)
            return z * torch.sigmoid(z)

    m, x = M().eval(), torch.randn(1, 3, 5, 5)
    gm = optimize(m, [x])
    assert gm.fusepass_report.counts == {"conv2d.silu_mul": 2}
    with torch.no_grad():
        assert_close(gm(x), m(x))


def test_sigmoid_of_a_different_tensor_is_not_silu():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(3, 4, 1)

        def forward(self, x):
            y = self.a(x)
            return y * torch.sigmoid(y + 1)

    m, x = M().eval(), torch.randn(1, 3, 5, 5)
    gm = optimize(m, [x])
    assert "conv2d.silu_mul" not in gm.fusepass_report.counts
    with torch.no_grad():
        assert_close(gm(x), m(x))


@pytest.mark.parametrize("k,dilation", [(3, 1), (4, 1), (3, 2), (2, 3)])
@pytest.mark.parametrize("family", ["conv1d", "conv2d"])
def test_padding_same_including_asymmetric(family, k, dilation):
    """padding="same" with an even effective kernel pads asymmetrically: ATen spells it
    as a pad then a conv; both forms must fuse their relu and match eager."""
    conv = {"conv1d": torch.nn.Conv1d, "conv2d": torch.nn.Conv2d}[family]
    torch.manual_seed(0)
    m = torch.nn.Sequential(conv(4, 6, k, padding="same", dilation=dilation), torch.nn.ReLU()).eval()
    x = example(family, size=9)
    gm = optimize(m, [x])
    assert gm.fusepass_report.counts == {f"{family}.relu": 1}
    with torch.no_grad():
        assert_close(gm(x), m(x))
