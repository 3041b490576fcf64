"""Every binary row (conv{1,2,3}d.{add,sub,mul,div}, linear.{add,sub,mul}): matches once on
its own example, the op histogram before/after is what the row says, numerics match eager
(hypothesis), and the negative cases leave the graph unchanged with a reason."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fusepass.capture import capture, lift_module
from fusepass.patterns import TABLE, binary, binary_guards
from fusepass.rewrite import match_at
from tests.util import NATIVE_BF16, assert_close, examples, expect_decisions, histogram, optimize

OPS = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div}
CONV = {"conv1d": torch.nn.Conv1d, "conv2d": torch.nn.Conv2d, "conv3d": torch.nn.Conv3d}
# the binary rows, as the table has them (the cases below: a family in CONV or linear, an
# op in OPS; test_every_binary_row_has_a_case)
ROWS = [r.name for r in TABLE if any(r is b for b in binary.ROWS)]
CONV_ROWS = [r for r in ROWS if r.split(".")[0] in CONV]
LINEAR_ROWS = [r for r in ROWS if r.split(".")[0] == "linear"]
# (row, conv/linear on the right): add and mul also match `t + conv(x)`
CASES = [(r, False) for r in ROWS] + [(r, True) for r in ROWS if r.endswith((".add", ".mul"))]
CONV_KERNELS = ("mkldnn._convolution_pointwise.binary", "mkldnn._convolution_pointwise_.binary")


def fused(report) -> dict:
    """Rewrites of the fuse pass only (other passes record their own rows)."""
    out = {}
    for d in report.decisions:
        if d.stage == "fuse" and d.action == "rewritten":
            out[d.rule] = out.get(d.rule, 0) + 1
    return out


def declined(report, rule=None) -> list:
    return [d.reason for d in report.declined if rule is None or d.rule == rule]


class Residual(torch.nn.Module):
    """``op(x) (binop) t`` (or ``t (binop) op(x)``), then an optional eltwise; ``inner``
    makes the residual an in-graph tensor instead of the graph input itself."""

    def __init__(self, family, binop, swapped=False, post=None, inner=False, cin=4, cout=6,
                 groups=1, k=3, stride=1, padding=1, dilation=1, bias=True):
        super().__init__()
        if family == "linear":
            self.op = torch.nn.Linear(cin, cout, bias=bias)
        else:
            self.op = CONV[family](cin, cout, k, stride, padding, dilation, groups, bias)
        self.binop, self.swapped, self.post, self.inner = OPS[binop], swapped, post, inner

    def forward(self, x, t):
        if self.inner:
            t = torch.exp(torch.tanh(t))  # fresh, dead after the op, away from 0 (div)
        y = self.op(x)
        out = self.binop(t, y) if self.swapped else self.binop(y, t)
        return self.post(out) if self.post is not None else out


def inputs(family, batch=2, cin=4, size=7, cout=6, residual_scale=1.0):
    """x and a residual t with the op output's shape (abs >= 0.5, so div is tame)."""
    x = {"conv1d": (batch, cin, size), "conv2d": (batch, cin, size, size),
         "conv3d": (batch, cin, min(size, 5), size, size), "linear": (batch, 5, cin)}[family]
    t = {"linear": (batch, 5, cout)}.get(family, (batch, cout) + x[2:])
    t = torch.rand(t) + 0.5
    return torch.randn(x), t * torch.sign(torch.randn(t.shape)) * residual_scale


def kernel_of(family):
    return "mkldnn._linear_pointwise.binary" if family == "linear" else CONV_KERNELS


def count_kernel(h, family):
    names = kernel_of(family)
    return sum(h[k] for k in ((names,) if isinstance(names, str) else names))


def test_every_binary_row_has_a_case():
    assert ROWS and sorted(ROWS) == sorted(CONV_ROWS + LINEAR_ROWS)
    assert all(r.split(".")[1] in OPS for r in ROWS), ROWS


@pytest.mark.parametrize("row,swapped", [pytest.param(r, s, id=f"{r}-{s}")
                                         for r, s in CASES])
def test_row_matches_once_histogram_and_numerics(row, swapped):
    family, binop = row.split(".")
    torch.manual_seed(0)
    m = Residual(family, binop, swapped).eval()
    x, t = inputs(family)
    unfused = optimize(m, [x, t], disable=["fuse"])
    gm = optimize(m, [x, t])
    assert not unfused.fusepass_report.fell_back and not gm.fusepass_report.fell_back
    before, after = histogram(unfused), histogram(gm)
    ref = optimize(m, [x, t], lowering="reference")  # the pattern matches on any target
    assert fused(ref.fusepass_report) == {row: 1}, ref.fusepass_report.summary()
    if family == "conv1d":  # oneDNN's binary convs are 2-d/3-d only: declined, not fused
        assert fused(gm.fusepass_report) == {} and after == before, (before, after)
        assert any("2-d and 3-d" in r for r in declined(gm.fusepass_report))
    else:
        assert fused(gm.fusepass_report) == {row: 1}, gm.fusepass_report.summary()
        assert before[f"aten.{binop}"] == 1 and after[f"aten.{binop}"] == 0, (before, after)
        assert count_kernel(before, family) == 0 and count_kernel(after, family) == 1
        assert after["fusepass.conv"] == after["fusepass.linear"] == 0
    with torch.no_grad():
        assert_close(gm(x, t), m(x, t))


@pytest.mark.parametrize("family", [pytest.param(f, id=f)
                                    for f in ["conv1d", "conv2d", "conv3d"]])
@pytest.mark.parametrize("binop", ["add", "sub", "mul", "div"])
def test_conv_binary_then_relu_is_one_chain(family, binop):
    torch.manual_seed(0)
    m = Residual(family, binop, post=F.relu, inner=True).eval()
    x, t = inputs(family)
    gm = optimize(m, [x, t])
    if family == "conv1d":  # no binary conv1d kernel: nothing fused, the report says why
        assert fused(gm.fusepass_report) == {}
        assert any("2-d and 3-d" in r for r in declined(gm.fusepass_report))
    else:
        assert fused(gm.fusepass_report) == {f"{family}.{binop}": 1, f"{family}.relu": 1}
        h = histogram(gm)
        assert h["aten.relu"] == 0 and h[f"aten.{binop}"] == 0
        node = next(n for n in gm.graph.nodes if n.op == "call_function"
                    and str(n.target).startswith("mkldnn._convolution_pointwise"))
        assert binop in node.args and "relu" in node.args, node.args
    with torch.no_grad():
        assert_close(gm(x, t), m(x, t))


def test_linear_add_then_relu_keeps_the_relu():
    """No oneDNN linear kernel takes an eltwise after the binary post-op."""
    torch.manual_seed(0)
    m = Residual("linear", "add", post=F.relu).eval()
    x, t = inputs("linear")
    gm = optimize(m, [x, t])
    assert fused(gm.fusepass_report) == {"linear.add": 1}
    assert any("onednn has no linear kernel applying relu after add" in r for r in declined(gm.fusepass_report))
    assert histogram(gm)["aten.relu"] == 1
    with torch.no_grad():
        assert_close(gm(x, t), m(x, t))


def test_conv_add_then_silu_keeps_the_silu():
    torch.manual_seed(0)
    m = Residual("conv2d", "add", post=F.silu).eval()
    x, t = inputs("conv2d")
    gm = optimize(m, [x, t])
    assert fused(gm.fusepass_report) == {"conv2d.add": 1}
    assert any("onednn has no conv kernel applying silu after add" in r for r in declined(gm.fusepass_report))
    assert histogram(gm)["aten.silu"] == 1
    with torch.no_grad():
        assert_close(gm(x, t), m(x, t))


# --- numerics vs eager on drawn shapes -------------------------------------------------

@st.composite
def conv_case(draw, row):
    """Shapes, dtype and layout for one conv binary row (the row is the parameter)."""
    family, binop = row.split(".")
    groups = draw(st.sampled_from([1, 2, 4]))
    cout = groups * draw(st.sampled_from([1, 2, 3]))
    k, stride, dilation = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    size = draw(st.integers(dilation * (k - 1) + 1, 8))
    kw = dict(cin=4, cout=cout, groups=groups, k=k, stride=stride,
              padding=draw(st.integers(0, k // 2 * dilation)), dilation=dilation,
              bias=draw(st.booleans()))
    layout = "contiguous" if family == "conv1d" else draw(
        st.sampled_from(["contiguous", "channels_last", "mixed"]))
    return dict(family=family, binop=binop, kw=kw, batch=draw(st.integers(1, 3)), size=size,
                dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])), layout=layout,
                swapped=binop in ("add", "mul") and draw(st.booleans()),
                relu=draw(st.booleans()), inner=draw(st.booleans()))


@pytest.mark.parametrize("row", [pytest.param(r, id=r) for r in CONV_ROWS])
@settings(max_examples=examples(4))
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_conv_rows_numerics_vs_eager(row, data, seed):
    case = data.draw(conv_case(row), label="case")
    torch.manual_seed(seed)
    family, binop, kw, dtype = case["family"], case["binop"], case["kw"], case["dtype"]
    m = Residual(family, binop, case["swapped"], F.relu if case["relu"] else None,
                 case["inner"], **kw).eval().to(dtype)
    x = inputs(family, case["batch"], 4, case["size"])[0]
    with torch.no_grad():
        t = torch.rand_like(m.op(x.to(dtype)).float()) + 0.5
    x, t = x.to(dtype), (t * torch.sign(torch.randn(t.shape))).to(dtype)
    if case["layout"] != "contiguous":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.to(memory_format=fmt)
        t = t.to(memory_format=fmt) if case["layout"] == "channels_last" else t
    t0 = t.clone()
    gm = optimize(m, [x, t])
    rep = gm.fusepass_report
    with torch.no_grad():
        expected = m(x, t)
        got = gm(x, t)
    # where eager lays the result out otherwise than the fused kernel would write it
    # (size-1 dims count: C == 1 mixed layouts), or where torch 2.8's oneDNN cannot take
    # such a layout at all (the IPEX env), the row declines; the strides below hold
    layout = [r for r in declined(rep, row) if "oneDNN's conv writes" in r
              or "lays the result out" in r or "cannot create the memory" in r]
    want = {row: 1} | ({f"{family}.relu": 1} if case["relu"] else {})
    if layout:
        want = {}
    elif family == "conv1d" or (dtype == torch.bfloat16 and not NATIVE_BF16):
        # no binary conv1d kernel; no bf16 kernel on this CPU: declined, saying which
        want = {}
        why = (["2-d and 3-d"] if family == "conv1d" else []) + (
            ["CPU lacks native bf16"] if dtype == torch.bfloat16 and not NATIVE_BF16 else [])
        assert any(w in r for r in declined(rep, row) for w in why), rep
    assert fused(rep) == want, rep.summary()
    # with native bf16, add+relu off oneDNN's channels-last path (NCHW or grouped, seen
    # only after propagate_layout) would hit add_relu_, which has no bf16 kernel: lowering
    # splits the relu off the fused conv+add and says so (tests/test_inplace.py's case)
    kept = list(rep.where(stage="lower", action="kept"))
    if kept:
        assert dtype == torch.bfloat16 and NATIVE_BF16 and binop == "add" and case["relu"], rep
        assert kw["groups"] > 1 or case["layout"] == "contiguous", (kw, case["layout"], rep)
        assert all("bf16 add+relu on a non-channels-last or grouped conv" in d.reason
                   and "relu run(s) as ATen after the kernel" in d.reason for d in kept), rep
        expect_decisions(kept)
    # the memory layout eager gives (strides of dims of size > 1; exact strides of size-1
    # dims of C == 1 results are tests/test_strides.py's business)
    assert [s for s, d in zip(got.stride(), got.shape) if d > 1] == \
        [s for s, d in zip(expected.stride(), expected.shape) if d > 1], (got.stride(), expected.stride())
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert_close(got, expected, dtype)
    assert torch.equal(t, t0), "the residual input was written"


@pytest.mark.parametrize("row", LINEAR_ROWS)
@settings(max_examples=examples(8))
@given(st.booleans(), st.booleans(), st.sampled_from([(2,), (1, 3), (2, 5)]), st.integers(1, 16),
       st.integers(1, 16), st.booleans(), st.sampled_from([torch.float32, torch.bfloat16]),
       st.integers(0, 2**16))
def test_linear_rows_numerics_vs_eager(row, swapped, inner, lead, cin, cout, bias, dtype, seed):
    torch.manual_seed(seed)
    binop = row.split(".")[1]
    swapped = swapped and binop in ("add", "mul")
    m = Residual("linear", binop, swapped, None, inner, cin=cin, cout=cout, bias=bias)
    m = m.eval().to(dtype)
    x = torch.randn(*lead, cin).to(dtype)
    t = (torch.rand(*lead, cout) + 0.5).to(dtype)
    gm = optimize(m, [x, t])
    want = {} if dtype == torch.bfloat16 and not NATIVE_BF16 else {row: 1}
    assert fused(gm.fusepass_report) == want
    with torch.no_grad():
        assert_close(gm(x, t), m(x, t), dtype)


# --- negative cases: the graph keeps its binary op, the report says why ----------------

class Neg(torch.nn.Module):
    def __init__(self, fn, family="conv2d"):
        super().__init__()
        self.op = torch.nn.Linear(4, 6) if family == "linear" else CONV[family](4, 6, 3, padding=1)
        self.register_buffer("c", torch.rand(6, 1, 1) + 0.5)
        self.fn = fn

    def forward(self, x, t):
        return self.fn(self, self.op(x), t)


NEGATIVES = {
    # name: (fn(self, y, t), t's shape (None: like y), t's dtype, reason, the row that must
    #        not rewrite, the op left over)
    "broadcast [C,1,1]": (lambda s, y, t: y + t, (6, 1, 1), None, "other broadcasts",
                          "conv2d.add", "aten.add"),
    "output broadcasts": (lambda s, y, t: y * t, (3, 6, 5, 5), None, "the output broadcasts",
                          "conv2d.mul", "aten.mul"),
    "alpha": (lambda s, y, t: torch.add(y, t, alpha=2), None, None, "alpha=2", "conv2d.add",
              "aten.add"),
    "sub alpha": (lambda s, y, t: torch.sub(y, t, alpha=0.5), None, None, "alpha=0.5",
                  "conv2d.sub", "aten.sub"),
    "dtype promotion": (lambda s, y, t: y + t, None, torch.float64, "dtype promotion",
                        "conv2d.add", "aten.add"),
    "relu first": (lambda s, y, t: F.relu(y) + t, None, None, "already has eltwise post-ops",
                   "conv2d.add", "aten.add"),
    "second binary": (lambda s, y, t: (y + t) * t, None, None, "already has a binary post-op",
                      "conv2d.mul", "aten.mul"),
    "conv output used twice": (lambda s, y, t: (y + t) * y.sum(), None, None, "has 2 users",
                               "conv2d.add", "aten.add"),
    "conv output is an output": (lambda s, y, t: (y + t, y), None, None, "is a graph output",
                                 "conv2d.add", "aten.add"),
    "y + y": (lambda s, y, t: y + y, None, None, "other is the conv/linear output itself",
              "conv2d.add", "aten.add"),
    "linear broadcast [out]": (lambda s, y, t: y + t, (6,), None, "other broadcasts",
                               "linear.add", "aten.add"),
    "linear alpha": (lambda s, y, t: torch.add(t, y, alpha=3), None, None, "alpha=3",
                     "linear.add", "aten.add"),
}


@pytest.mark.parametrize("name", NEGATIVES)
def test_negative_cases_leave_the_graph_and_say_why(name):
    fn, tshape, tdtype, reason, row, left = NEGATIVES[name]
    family = row.split(".")[0]
    torch.manual_seed(0)
    m = Neg(fn, family).eval()
    x = torch.randn(1, 5, 4) if family == "linear" else torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        y = m.op(x)
    t = torch.randn(tshape or y.shape, dtype=tdtype or torch.float32)
    unfused = optimize(m, [x, t], disable=["fuse"])
    gm = optimize(m, [x, t])
    rep = gm.fusepass_report
    assert row not in fused(rep), rep.summary()
    assert any(reason in r for r in declined(rep, row)), rep.summary()
    assert histogram(gm)[left] == histogram(unfused)[left] >= 1
    with torch.no_grad():
        assert_close(gm(x, t), m(x, t), torch.float32)  # the conv runs in fp32 throughout


CONSTANTS = {
    # name: (fn(self, y, t), passes disabled, *outcomes): ("folded", the fold row) or
    #       ("declined", the row that declines, its reason); the binary rows never fuse it
    "per-channel constant folds": (lambda s, y, t: y + s.c, [],
                                   ("folded", "fold.const.conv.add")),
    "scalar folds": (lambda s, y, t: y * 2.0, [], ("folded", "fold.const.conv.mul")),
    "per-channel constant, folding off": (
        lambda s, y, t: y + s.c, ["fold_binary_constants"],
        ("declined", "conv2d.add", "other is a constant that broadcasts")),
    "scalar, folding off": (lambda s, y, t: y * 2.0, ["fold_binary_constants"],
                            ("declined", "conv2d.mul", "other is the scalar 2.0")),
    # neither folds (not per channel) nor fuses (not the output's shape)
    "non-channel constant": (
        lambda s, y, t: y + s.c.view(1, 1, 1, 6)[..., :5], [],
        ("declined", "fold.const.conv.add", "broadcasts along non-channel dim(s) [3]"),
        ("declined", "conv2d.add", "other is a constant that broadcasts")),
}


@pytest.mark.parametrize("name", CONSTANTS)
def test_constant_operands_are_folding_business(name):
    """A per-channel constant or a scalar folds into the weights (fold_binary_constants);
    the binary rows never take a constant, and say why when nothing folded it first."""
    fn, disable, *outcomes = CONSTANTS[name]
    torch.manual_seed(0)
    m = Neg(fn).eval()
    x, t = torch.randn(1, 4, 5, 5), torch.randn(1, 6, 5, 5)
    gm = optimize(m, [x, t], disable=disable)
    rep = gm.fusepass_report
    assert not any(r.startswith("conv2d.") for r in fused(rep)), rep.summary()
    op = "aten.mul" if outcomes[0][1].endswith(".mul") else "aten.add"
    folded = [o[1] for o in outcomes if o[0] == "folded"]
    assert rep.counts == {row: 1 for row in folded}, rep.summary()
    for _, row, reason in (o for o in outcomes if o[0] == "declined"):
        assert any(reason in r for r in declined(rep, row)), (row, reason, rep.summary())
    if folded:  # folded before fuse ran: no binary row saw it
        assert not [d for d in rep.declined if d.rule.startswith("conv2d.")], rep.summary()
    assert histogram(gm)[op] == (0 if folded else 1)
    with torch.no_grad():
        assert_close(gm(x, t), m(x, t))


def test_conv_as_subtrahend_is_not_a_candidate():
    """t - conv(x) has no post-op form (sub/div take the conv on the left only)."""
    torch.manual_seed(0)
    for fn in (lambda s, y, t: t - y, lambda s, y, t: t / y):
        m = Neg(fn).eval()
        x, t = torch.randn(1, 4, 5, 5), torch.randn(1, 6, 5, 5)
        gm = optimize(m, [x, t])
        assert fused(gm.fusepass_report) == {}
        with torch.no_grad():
            assert_close(gm(x, t), m(x, t))


def _captured(m, *args):
    lifted, weights = lift_module(torch.fx.symbolic_trace(m))
    with torch.no_grad():
        return capture(lifted, weights() + list(args), freeze=True).gm


def test_cycle_guard_finds_a_path_from_the_conv_to_other():
    """y + relu(y): other depends on the conv output. The engine already declines it (the
    conv has a second user); the guard alone must say so too, via the networkx path."""
    m = Neg(lambda s, y, t: y + F.relu(y)).eval()
    gm = _captured(m, torch.randn(1, 4, 5, 5), torch.randn(1, 6, 5, 5))
    add = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.add.Tensor)
    match = match_at(next(r for r in binary.ROWS if r.name == "conv2d.add"), gm, add)
    assert match is not None and match["other"].target is torch.ops.aten.relu.default
    assert "would create a cycle" in binary_guards.no_cycle(match)
    out = optimize(m, [torch.randn(1, 4, 5, 5), torch.randn(1, 6, 5, 5)])
    assert fused(out.fusepass_report) == {} and histogram(out)["aten.add"] == 1


def test_cycle_guard_passes_an_independent_later_operand():
    """other computed after the conv but not from it (ResNet's downsample branch)."""
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.Conv2d(4, 6, 1)

        def forward(self, x):
            y = self.a(x)
            return F.relu(y + self.b(torch.sin(x)))

    m, x = M().eval(), torch.randn(2, 4, 6, 6)
    gm = _captured(m, x)
    add = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.add.Tensor)
    match = match_at(next(r for r in binary.ROWS if r.name == "conv2d.add"), gm, add)
    assert match["other"] > match.fused
    assert binary_guards.no_cycle(match) is None
    out = optimize(m, [x])
    assert fused(out.fusepass_report) == {"conv2d.add": 1, "conv2d.relu": 1}
    with torch.no_grad():
        assert_close(out(x), m(x))


def test_through_the_torch_compile_backend():
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = Residual("conv2d", "add", post=F.relu, inner=True).eval()
    x, t = inputs("conv2d")
    with torch.no_grad():
        got = torch.compile(m, backend="fusepass")(x, t)
        want = m(x, t)
    torch._dynamo.reset()
    assert_close(got, want)


def test_constant_evaluation_walks_a_deep_graph_without_recursing():
    """``evaluate_constants`` asks of a replacement's nodes whether they are constant
    expressions, walking their inputs back through the graph: on EfficientNet-B0's int8
    graph (~1,500 nodes deep) a recursive walk raised RecursionError inside a row (an
    ``error`` decision, the conv2d.add left unfused). A chain deeper than Python's
    recursion limit, then a constant expression next to it: the chain is no constant,
    the expression is folded."""
    import sys

    import torch.fx as fx

    from fusepass.rewrite import evaluate_constants
    g = fx.Graph()
    y = g.placeholder("x")
    for _ in range(sys.getrecursionlimit() + 500):
        y = g.call_function(torch.ops.aten.relu.default, (y,))
    w = g.get_attr("w")
    c = g.call_function(torch.ops.aten.mul.Tensor, (w, 2.0))
    out = g.call_function(torch.ops.aten.add.Tensor, (y, c))
    g.output(out)
    gm = fx.GraphModule({"w": torch.ones(3)}, g)
    assert evaluate_constants(gm, [out], out) is out  # not constant: no RecursionError
    assert evaluate_constants(gm, [c], c).op == "get_attr"  # folded
    folded = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target != "w")
    assert torch.equal(getattr(gm, folded.target), torch.full((3,), 2.0))


def test_constant_evaluation_runs_nothing_upstream_of_a_non_constant_node():
    """Whether a replacement's node is a constant expression is decided before anything
    is evaluated. Evaluating while walking ran every constant sub-expression upstream of
    the node — on an int8 graph each layer's ``dequantize(weight)`` — once per rewrite:
    MobileNetV3's int8 compile spent 17 s in 2,160 dequantize calls for 184 rewrites.
    A chain of layers each reading ``f(w_i)``: asking about the last layer evaluates no
    ``f``; asking about a constant expression evaluates it once, and only it."""
    import torch.fx as fx

    from fusepass.rewrite import evaluate_constants
    calls = []

    def f(w):  # a constant sub-expression (dequantize(weight) in the int8 graph)
        calls.append(w)
        return w * 2

    g = fx.Graph()
    y = g.placeholder("x")
    weights = {}
    for i in range(5):
        weights[f"w{i}"] = torch.full((3,), float(i))
        y = g.call_function(torch.ops.aten.add.Tensor, (y, g.call_function(f, (g.get_attr(f"w{i}"),))))
    g.output(y)
    gm = fx.GraphModule(weights, g)
    assert evaluate_constants(gm, [y], y) is y
    assert calls == []
    fw4 = y.args[1]
    folded = evaluate_constants(gm, [fw4], fw4)
    assert folded.op == "get_attr" and len(calls) == 1
    assert torch.equal(getattr(gm, folded.target), torch.full((3,), 8.0))


@pytest.mark.parametrize("family", ["conv2d", "conv3d"])
def test_a_binary_conv_with_one_output_pixel_fuses_where_onednn_can_build_it(family):
    """torch 2.8's oneDNN (the IPEX env) cannot create the memory of a channels-last
    binary conv with one output pixel (or one channel, not both); 2.13's can. Where the
    probe says it cannot, the row declines with the reason (once a 3-d case slipped past a
    2-d-only check and fell back at run time); where it can, the row fuses. Either way the
    output is eager's."""
    from fusepass.lowering.onednn import binary_one_channel_works
    torch.manual_seed(0)
    m = Residual(family, "add", k=2, padding=0, cout=2).eval()
    spatial = (2, 2) if family == "conv2d" else (2, 2, 2)
    fmt = torch.channels_last if family == "conv2d" else torch.channels_last_3d
    x = torch.randn(2, 4, *spatial).to(memory_format=fmt)
    t = torch.randn(2, 2, *[1] * len(spatial))  # the conv's output: 2 channels, one pixel
    gm = optimize(m, [x, t])
    rep = gm.fusepass_report
    if binary_one_channel_works(x.dim()):
        assert rep.counts == {f"{family}.add": 1}, rep.summary()
    else:
        assert rep.counts == {}, rep.summary()
        assert any("one output channel or one output pixel" in r for r in declined(rep, f"{family}.add")), rep
    with torch.no_grad():
        assert_close(gm(x, t), m(x, t))
