"""fold_binary_constants: every ``fold.const.*`` row matches once on its own example with
the op histogram it promises, numerics match eager (every row with every op of its family,
hypothesis drawing shapes, dtype, layout and the constant's form), chains fold to one
conv, and each guard declines with its reason while leaving the graph unchanged."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fusepass
from fusepass.patterns import TABLE
from tests.util import assert_close, examples, histogram, optimize

CONST_ROWS = TABLE.select("fold.const.")
NO_FOLDS = ["fold_batchnorm", "fold_binary_constants", "fuse"]

# spelling -> (eager fn of (y, c), the ATen op it captures to)
SPELLINGS = {
    "add": (lambda y, c: y + c, "aten.add"),
    "add_alpha_rev": (lambda y, c: torch.add(c, y, alpha=-1.5), "aten.add"),
    "sub": (lambda y, c: y - c, "aten.sub"),
    "rsub": (lambda y, c: c - y, "aten.sub"),
    "rsub_scalar": (lambda y, c: torch.rsub(y, 1.5, alpha=2), "aten.rsub"),
    "rsub_tensor": (lambda y, c: torch.rsub(y, c), "aten.rsub"),
    "mul": (lambda y, c: c * y, "aten.mul"),
    "div": (lambda y, c: y / c, "aten.div"),
    "rdiv": (lambda y, c: c / y, "aten.div"),
}


class Block(nn.Module):
    """conv/linear, then ``fn(y, self.c)``; ``c`` is a frozen buffer (None: a literal)."""

    def __init__(self, op, fn, c=None):
        super().__init__()
        self.op, self.fn = op, fn
        self.register_buffer("c", c)

    def forward(self, x):
        return self.fn(self.op(x), self.c)


def conv2d(cin=4, cout=6, **kw):
    return nn.Conv2d(cin, cout, 3, padding=1, **kw)


def per_channel(family, cout=6, lo=0.5, hi=2.0):
    """A per-output-channel constant away from 0 (a divisor, a scale)."""
    v = (torch.rand(cout) * (hi - lo) + lo) * (torch.randint(0, 2, (cout,)) * 2 - 1)
    return v.view(cout, 1, 1) if family == "conv" else v


def row_example(family, spelling):
    torch.manual_seed(0)
    op = conv2d() if family == "conv" else nn.Linear(5, 6)
    x = torch.randn(2, 4, 7, 7) if family == "conv" else torch.randn(2, 3, 5)
    return Block(op, SPELLINGS[spelling][0], per_channel(family)).eval(), x


def test_every_const_row_has_an_example():
    assert sorted(r.name for r in CONST_ROWS) == sorted(
        f"fold.const.{f}.{s}" for f in ("conv", "linear") for s in SPELLINGS)


@pytest.mark.parametrize("row", [r.name for r in CONST_ROWS])
def test_row_matches_once_histogram_and_numerics(row):
    _, _, family, spelling = row.split(".")
    m, x = row_example(family, spelling)
    aten_op = SPELLINGS[spelling][1]
    before = histogram(optimize(m, [x], disable=NO_FOLDS, lowering="reference"))
    gm = optimize(m, [x], disable=["fuse"], lowering="reference")
    after, report = histogram(gm), gm.fusepass_report
    kernel = "aten.convolution" if family == "conv" else "aten.linear"
    assert before[aten_op] == 1 and before[kernel] == after[kernel] == 1
    if spelling == "rdiv":  # never folds: matched once, declined once, graph unchanged
        assert not report.counts
        assert [d.rule for d in report.declined if d.rule.startswith("fold.")] == [row]
        assert after == before
    else:
        assert report.counts == {row: 1}, report
        assert sum(after.values()) == 1, after  # only the conv/linear is left
    with torch.no_grad():
        assert_close(gm(x), m(x))
        assert_close(optimize(m, [x])(x), m(x))


def test_chain_becomes_one_conv():
    """conv -> *2 -> +1 -> /3 -> -c -> c*: one conv with every constant in W and b."""
    fn = lambda y, c: c * ((y * 2 + 1) / 3 - c)  # noqa: E731
    torch.manual_seed(0)
    m, x = Block(conv2d(), fn, per_channel("conv")).eval(), torch.randn(1, 4, 8, 8)
    gm = optimize(m, [x], disable=["fuse"], lowering="reference")
    assert histogram(gm) == {"aten.convolution": 1}
    assert sum(gm.fusepass_report.counts.values()) == 5
    with torch.no_grad():
        assert_close(gm(x), m(x))


@pytest.mark.parametrize("spelling", ["scalar", "int", "0-d", "0-d float64", "[C,1,1]",
                                      "[1,C,1,1]", "int [C,1,1]", "bool [C,1,1]"])
def test_constant_spellings_that_fold(spelling):
    c = {"scalar": 0.75, "int": 3, "0-d": torch.tensor(-1.25),
         "0-d float64": torch.tensor(0.5, dtype=torch.float64),
         "[C,1,1]": per_channel("conv"), "[1,C,1,1]": per_channel("conv").view(1, 6, 1, 1),
         "int [C,1,1]": torch.arange(-3, 3).view(6, 1, 1),
         "bool [C,1,1]": torch.arange(6).view(6, 1, 1) % 2 == 0}[spelling]
    tensor = isinstance(c, torch.Tensor)
    fn = (lambda y, k: (y * k + k) * k) if tensor else (lambda y, k: (y * c + c) * c)
    m = Block(conv2d(), fn, c if tensor else None).eval()
    x = torch.randn(2, 4, 6, 6)
    gm = optimize(m, [x], disable=["fuse"], lowering="reference")
    assert sum(gm.fusepass_report.counts.values()) == 3, gm.fusepass_report
    assert histogram(gm) == {"aten.convolution": 1}
    with torch.no_grad():
        assert_close(gm(x), m(x))


# The property test's case table: every fold.const row with every op of its family, and
# the constant forms that fold by that row (a number ``c - y`` is rsub_scalar's, rsub_scalar
# spells its own number, ``c / y`` with a number is no candidate at all).
FOLD_OPS = {"conv": ["conv1d", "conv2d", "conv3d",
                     "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"],
            "linear": ["linear"]}
FORMS = {s: ("tensor", "scalar") for s in SPELLINGS} | {
    "rsub": ("tensor",), "rsub_tensor": ("tensor",), "rsub_scalar": ("scalar",),
    "rdiv": ("tensor",)}
FOLD_CASES = [(r.name, op) for r in CONST_ROWS for op in FOLD_OPS[r.name.split(".")[2]]]


def test_every_const_row_has_property_cases():
    assert sorted({row for row, _ in FOLD_CASES}) == sorted(r.name for r in CONST_ROWS)
    assert set(FORMS) == set(SPELLINGS)


@st.composite
def case(draw, op, spelling):
    """Shapes, dtype, layout and the constant's form for ``op`` ("conv2d", "linear", ...)."""
    family = "linear" if op == "linear" else op[:-2]
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    bias = draw(st.booleans())
    scalar = draw(st.sampled_from(FORMS[spelling])) == "scalar"
    if family == "linear":
        cin, cout = draw(st.integers(1, 8)), draw(st.integers(1, 8))
        shape = (draw(st.integers(1, 3)),) * draw(st.integers(0, 2)) + (cin,)
        return family, dict(cin=cin, cout=cout, bias=bias), shape, dtype, False, scalar
    rank, groups = int(op[-2]), draw(st.sampled_from([1, 2, 3]))
    cin = groups * draw(st.integers(1, 2))
    cout = cin if draw(st.booleans()) else groups * draw(st.integers(1, 3))  # depthwise or not
    k, stride = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    size = draw(st.integers(k, 6 if rank < 3 else 4))
    # a transposed conv's output (size-1)*stride - 2*padding + k must not be empty
    padding = draw(st.integers(0, 1 if family == "conv" or (size - 1) * stride + k > 2 else 0))
    kw = dict(cin=cin, cout=cout, k=k, stride=stride, padding=padding, groups=groups, bias=bias)
    channels_last = rank > 1 and draw(st.booleans())
    return family, kw, (2, cin) + (size,) * rank, dtype, channels_last, scalar


def make_op(family, rank, kw):
    kw = dict(kw)
    cin, cout = kw.pop("cin"), kw.pop("cout")
    if family == "linear":
        return nn.Linear(cin, cout, **kw)
    k = kw.pop("k")
    cls = {"conv": [nn.Conv1d, nn.Conv2d, nn.Conv3d],
           "conv_transpose": [nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d]}[family]
    return cls[rank - 1](cin, cout, k, **kw)


@pytest.mark.parametrize("row,op", FOLD_CASES, ids=[f"{row}-{op}" for row, op in FOLD_CASES])
@settings(max_examples=examples(2))
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_fold_numerics_vs_eager(row, op, data, seed):
    spelling = row.split(".")[3]
    family, kw, shape, dtype, channels_last, scalar = data.draw(case(op, spelling), label="case")
    torch.manual_seed(seed)
    rank = len(shape) - 2
    op = make_op(family, rank, kw)
    if family == "linear":
        c = per_channel("linear", kw["cout"])
    else:
        c = per_channel("conv", kw["cout"]).view([kw["cout"]] + [1] * rank)
    m = Block(op, SPELLINGS[spelling][0], None if scalar else c).eval().to(dtype)
    if scalar:
        m.fn = lambda y, _, f=SPELLINGS[spelling][0]: f(y, -1.75)
    x = torch.randn(shape).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if rank == 2 else torch.channels_last_3d)
    gm = optimize(m, [x])
    report = gm.fusepass_report
    folds = {k: v for k, v in report.counts.items() if k.startswith("fold.")}
    if spelling == "rdiv":  # never folds: declined by its row, the graph keeps the div
        assert folds == {}
        assert [d.rule for d in report.declined if d.rule.startswith("fold.")] == [row], report
        assert histogram(gm)["aten.div"] == 1
    else:
        assert folds == {row: 1}, report
    with torch.no_grad():
        want, got = m(x), gm(x)
    assert got.dtype == want.dtype and got.shape == want.shape
    if spelling == "rdiv":  # c / y is ill-conditioned where y ~ 0: compare y = c / (c / y)
        want, got = m.c / want, m.c / got
    assert_close(got, want, dtype)


def test_backend_folds_a_chain():
    torch._dynamo.reset()
    m = Block(conv2d(), lambda y, c: (y * c + 1.0) / 3.0 - c, per_channel("conv")).eval()
    x = torch.randn(1, 4, 6, 6)
    report = fusepass.explain(m, x)
    assert {k: v for k, v in report.counts.items() if k.startswith("fold.")} == {
        "fold.const.conv.mul": 1, "fold.const.conv.add": 1, "fold.const.conv.div": 1,
        "fold.const.conv.sub": 1}, report
    with torch.no_grad():
        assert_close(torch.compile(m, backend="fusepass")(x), m(x))


def test_shared_weight_and_user_parameters_stay_untouched():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv2d()

        def forward(self, x):
            return self.conv(x) * 3.0, self.conv(x + 1)

    m, x = Shared().eval(), torch.randn(1, 4, 5, 5)
    state = {k: (v.clone(), v._version, v.data_ptr()) for k, v in m.state_dict().items()}
    gm = optimize(m, [x])
    assert gm.fusepass_report.counts.get("fold.const.conv.mul") == 1
    with torch.no_grad():
        assert_close(gm(x), m(x))
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k][0]) and (v._version, v.data_ptr()) == state[k][1:]


# --- negative cases: the op stays, the report says why ------------------------------------

def _neg(fn, c=None, family="conv", dtype=torch.float32):
    op = conv2d() if family == "conv" else nn.Linear(5, 6)
    if dtype.is_floating_point:
        op = op.to(dtype)
    else:  # integer linear: CPU addmm takes int64, nn.Module.to does not
        op.weight = nn.Parameter(torch.randint(-3, 3, (6, 5)), requires_grad=False)
        op.bias = nn.Parameter(torch.randint(-3, 3, (6,)), requires_grad=False)
    x = torch.randn(1, 4, 6, 6) if family == "conv" else torch.randn(2, 5)
    x = x.to(dtype) if dtype.is_floating_point else torch.randint(-3, 3, x.shape)
    return Block(op, fn, c).eval(), x


NEGATIVE = {
    "non-channel": (lambda: _neg(lambda y, c: y + c, torch.randn(1, 1, 1, 6)),
                    "broadcasts along non-channel dim(s) [3]"),
    "non-channel-linear": (lambda: _neg(lambda y, c: y * c, torch.randn(2, 1), "linear"),
                           "broadcasts along non-channel dim(s) [0]"),
    "enlarges": (lambda: _neg(lambda y, c: y - c, torch.randn(2, 6, 1, 1)), "would enlarge"),
    "enlarges-rank": (lambda: _neg(lambda y, c: y * c, torch.randn(1, 1, 6, 1, 1)),
                      "would enlarge"),
    "promotion-f64": (lambda: _neg(lambda y, c: y + c, torch.randn(6, 1, 1, dtype=torch.float64)),
                      "dtype promotion"),
    "promotion-bf16": (lambda: _neg(lambda y, c: y * c.float(), torch.randn(6, 1, 1),
                                    dtype=torch.bfloat16), "dtype promotion"),
    "two-users": (lambda: _neg(lambda y, c: (y * 2) + torch.relu(y)), "has 2 users"),
    "graph-output": (lambda: _neg(lambda y, c: (y * 2, y)), "is a graph output"),
    "integer": (lambda: _neg(lambda y, c: y * 3, family="linear", dtype=torch.int64),
                "integer linear output"),
    "inf": (lambda: _neg(lambda y, c: y + math.inf), "not finite"),
    "nan-tensor": (lambda: _neg(lambda y, c: y * c, torch.tensor([1., 2, math.nan, 1, 1, 1]).view(6, 1, 1)),
                   "not finite"),
    "div-zero": (lambda: _neg(lambda y, c: y / 0), "division by zero"),
    "div-zero-tensor": (lambda: _neg(lambda y, c: y / c, torch.tensor([1., 2, 0, 1, 1, 1]).view(6, 1, 1)),
                        "division by zero"),
    "rdiv": (lambda: _neg(lambda y, c: c / y, per_channel("conv")), "not affine"),
}


@pytest.mark.parametrize("name", sorted(NEGATIVE))
def test_unfoldable_constant_is_declined_with_a_reason(name):
    make, reason = NEGATIVE[name]
    m, x = make()
    base = histogram(optimize(m, [x], disable=NO_FOLDS))
    gm = optimize(m, [x], disable=["fuse"])
    report = gm.fusepass_report
    if name == "integer":  # no kernel for an integer linear: plain ATen, and says so
        (d,) = report.where(stage="lower", action="declined")
        assert "torch.int64" in d.reason and histogram(gm)["fusepass.linear"] == 0, d
    assert not [k for k in report.counts if k.startswith("fold.")], report
    declined = report.where(stage="fold_binary_constants", action="declined")
    assert declined and all(reason in d.reason for d in declined), report
    assert histogram(gm) == base
    with torch.no_grad():
        got, want = gm(x), m(x)
    for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        assert torch.isfinite(g).eq(torch.isfinite(w)).all()
        if w.is_floating_point():
            assert_close(torch.nan_to_num(g, 0, 0, 0), torch.nan_to_num(w, 0, 0, 0), x.dtype)
        else:
            assert torch.equal(g, w)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = conv2d(cin=4, cout=4)

    def forward(self, x):
        return self.conv(x) + x


def test_runtime_operand_is_no_candidate():
    """conv(x) + x is the fuse pass's binary post-op, not a fold: no fold decision at all."""
    m, x = Residual().eval(), torch.randn(1, 4, 5, 5)
    gm = optimize(m, [x], disable=["fuse"])
    assert not [d for d in gm.fusepass_report.decisions if d.rule.startswith("fold.")]
    with torch.no_grad():
        assert_close(gm(x), m(x))


def test_runtime_weight_is_declined():
    """A conv whose weight is a graph input (not frozen) cannot be folded."""
    class Fn(nn.Module):
        def forward(self, x, w):
            return F.conv2d(x, w) * 2.0

    x, w = torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)
    gm = optimize(Fn(), [x, w], disable=["fuse"])
    declined = gm.fusepass_report.where(stage="fold_binary_constants", action="declined")
    assert declined and "weight of" in declined[0].reason and "not a frozen constant" in declined[0].reason
    with torch.no_grad():
        assert_close(gm(x, w), Fn()(x, w))


def test_fold_through_a_user_written_constant_expression_leaves_no_runtime_math():
    """The constant is a view/expand of a buffer: the folded weight is still one constant,
    not float64 math that would run on every call."""
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.register_buffer("c", torch.rand(4) + 0.5)

        def forward(self, x):
            return self.conv(x) * self.c.view(1, 4, 1, 1).expand(1, 4, 1, 1)

    torch.manual_seed(0)
    m, x = M().eval(), torch.randn(1, 3, 8, 8)
    gm = optimize(m, [x])
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert ops == [torch.ops.mkldnn._convolution_pointwise.default], ops
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x))
