"""inplace_pointwise: an elementwise ATen op left after lowering writes into an operand's
buffer only when that buffer is dead after the op and no input, output, constant or
live alias can observe it. Expected values come from eager PyTorch; each case also
checks the graph's form (which op became in place, into which operand)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.util import assert_close, examples, histogram, optimize


class SE(torch.nn.Module):
    """Squeeze-excite as in EfficientNet: y = silu(conv(x)) * sigmoid(se(mean(...)))."""

    def __init__(self, c=8, gate_first=False):
        super().__init__()
        self.dw = torch.nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.se1, self.se2 = torch.nn.Conv2d(c, 4, 1), torch.nn.Conv2d(4, c, 1)
        self.proj = torch.nn.Conv2d(c, c, 1)
        self.gate_first = gate_first

    def forward(self, x):
        h = F.silu(self.dw(x))
        g = torch.sigmoid(self.se2(F.silu(self.se1(h.mean((2, 3), keepdim=True)))))
        return self.proj(g * h if self.gate_first else h * g)


class Two(torch.nn.Module):
    """fn(x, t) as a module symbolic_trace can trace (two named inputs)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, t):
        return self.fn(x, t)


def _decisions(gm, action):
    return [d for d in gm.fusepass_report.where(stage="inplace_pointwise") if d.action == action]


def _mul_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and n.target in (torch.ops.aten.mul.Tensor, torch.ops.aten.mul_.Tensor)]


@pytest.mark.parametrize("gate_first", [False, True])
def test_se_gate_mul_runs_in_place_into_the_activation(gate_first):
    torch.manual_seed(0)
    m = SE(gate_first=gate_first).eval()
    x = torch.randn(2, 8, 6, 6)
    gm = optimize(m, [x])
    (mul,) = _mul_nodes(gm)
    assert mul.target is torch.ops.aten.mul_.Tensor, gm.graph
    # the receiving operand is the [2,8,6,6] activation, whichever side it was written on
    assert tuple(mul.args[0].meta["val"].shape) == (2, 8, 6, 6)
    assert tuple(mul.args[1].meta["val"].shape) == (2, 8, 1, 1)
    assert len(_decisions(gm, "rewritten")) >= 1
    with torch.no_grad():
        want = m(x)
        for _ in range(2):  # a second call must not see state the first left behind
            assert_close(gm(x), want)


def test_disabled_pass_leaves_the_functional_op():
    m = SE().eval()
    x = torch.randn(2, 8, 6, 6)
    gm = optimize(m, [x], disable=["inplace_pointwise"])
    assert [n.target for n in _mul_nodes(gm)] == [torch.ops.aten.mul.Tensor]


# (function of x, t -> output, ops that must stay functional, ops that must go in place)
CASES = {
    # a is read again after the mul and t is an input: neither may be overwritten (the
    # add after it may: the product is dead after the add)
    "read_again": (lambda x, t: (lambda a: (a * t) + a)(x.exp()), {"aten.mul"}, {"aten.add_"}),
    # ... but a fresh dead operand on either side receives the product
    "other_side": (lambda x, t: (lambda a: (a * t.sigmoid()) + a)(x.exp()),
                   set(), {"aten.mul_", "aten.add_"}),
    # the operand is the caller's tensor
    "graph_input": (lambda x, t: x * 2.0 + t, {"aten.mul"}, set()),
    # the dead operand is a graph output
    "graph_output": (lambda x, t: (lambda a: (a, a * t))(x.exp()), {"aten.mul"}, set()),
    # sub only writes into its first operand; the dead one is second
    "sub_second": (lambda x, t: t - x.exp(), {"aten.sub"}, set()),
    # add(t, y, alpha=3) = t + 3y: y is dead but the operands cannot swap
    "add_alpha": (lambda x, t: torch.add(t, x.exp(), alpha=3), {"aten.add"}, set()),
    # ... while the first operand, when dead, takes it
    "add_alpha_first": (lambda x, t: torch.add(x.exp(), t, alpha=3), set(), {"aten.add_"}),
    # the dead operand is broadcast: the result is larger than it
    "broadcast_small": (lambda x, t: x.mean(1, keepdim=True).exp() * t, {"aten.mul"}, set()),
    # a view of the dead buffer is read after the op
    "live_view": (lambda x, t: (lambda a: (a * t, a.view(-1)[:3]))(x.exp()), {"aten.mul"}, set()),
    # a plain chain: every intermediate is dead after its consumer
    "chain": (lambda x, t: ((x.exp() * t).sigmoid() + t).relu(),
              set(), {"aten.mul_", "aten.sigmoid_", "aten.add_", "aten.relu_"}),
}


@pytest.mark.parametrize("name", CASES)
def test_inplace_only_when_unobservable(name):
    fn, functional, inplace_ops = CASES[name]
    torch.manual_seed(0)
    x, t = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    x0, t0 = x.clone(), t.clone()
    gm = optimize(Two(fn), [x, t])
    h = histogram(gm, exact=True)
    for op in functional:
        assert h[op] >= 1 and h[op + "_"] == 0, (name, h)
    for op in inplace_ops:
        assert h[op] >= 1, (name, h)
    want = fn(x0, t0)
    for _ in range(2):
        assert_close(gm(x, t), want)
        assert torch.equal(x, x0) and torch.equal(t, t0), "an input was overwritten"


def test_dtype_promotion_is_not_done_in_place():
    def fn(x, t):
        k = (x > 0).to(torch.int64) * 3  # int64, dead after the mul
        return k * t  # float result: cannot live in k's int buffer

    x, t = torch.randn(3, 4), torch.randn(3, 4)
    gm = optimize(Two(fn), [x, t])
    assert gm.graph.find_nodes(op="call_function", target=torch.ops.aten.mul.Tensor)
    declined = _decisions(gm, "declined")
    assert any("dtype" in d.reason for d in declined), gm.fusepass_report
    assert_close(gm(x, t), fn(x, t))


_UNARY = [torch.relu, torch.sigmoid, torch.tanh, F.silu, F.hardswish, F.gelu]
_BINARY = [torch.add, torch.mul, torch.sub, torch.div,
           lambda a, b: torch.add(a, b, alpha=-2.5), lambda a, b: torch.sub(a, b, alpha=0.5)]


@st.composite
def programs(draw):
    """A random straight-line program over x, t: each step applies an op to earlier
    values; some values are read again later or returned, so liveness varies."""
    steps = []
    n_vals = 2
    for _ in range(draw(st.integers(2, 7))):
        if draw(st.booleans()):
            steps.append(("u", draw(st.sampled_from(range(len(_UNARY)))),
                          draw(st.integers(0, n_vals - 1))))
        else:
            steps.append(("b", draw(st.sampled_from(range(len(_BINARY)))),
                          draw(st.integers(0, n_vals - 1)), draw(st.integers(0, n_vals - 1))))
        n_vals += 1
    outs = draw(st.lists(st.integers(2, n_vals - 1), min_size=1, max_size=3, unique=True))
    return steps, outs


def _run(program, x, t):
    steps, outs = program
    vals = [x, t]
    for s in steps:
        if s[0] == "u":
            vals.append(_UNARY[s[1]](vals[s[2]]))
        else:
            a, b = vals[s[2]], vals[s[3]]
            vals.append(_BINARY[s[1]](a, b.sigmoid() + 0.5) if s[1] == 3 else _BINARY[s[1]](a, b))
    return tuple(vals[i] for i in outs)


@settings(max_examples=examples(40), deadline=None)
@given(programs())
def test_random_programs_match_eager_and_leave_inputs_alone(program):
    torch.manual_seed(0)
    x, t = torch.randn(2, 5), torch.randn(2, 5)
    x0, t0 = x.clone(), t.clone()
    want = _run(program, x0, t0)
    gm = optimize(Two(lambda a, b: _run(program, a, b)), [x, t])
    for _ in range(2):
        assert_close(gm(x, t), want)
        assert torch.equal(x, x0) and torch.equal(t, t0)
