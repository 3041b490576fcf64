"""Property tests on folded graphs (hypothesis), once per ``fold.const.*`` row.

A drawn graph: a conv (1d/2d/3d, transposed, grouped, depthwise, with or without bias)
or a linear, in fp32 or bf16, on a contiguous or channels_last input, then a chain of
1-5 add/sub/mul/div (also ``torch.add(.., alpha=)`` and ``torch.rsub``) in either operand
order with constants of foldable and unfoldable shapes, dtypes and values, sometimes with
an extra user of an intermediate. The test is parametrized over the table's fold.const
rows: the chain's first step is that row's spelling with a constant it folds (``rdiv``:
declines), so every row is drawn in every run; the rest of the chain is drawn. For each:
  (a) the optimized graph equals eager within the dtype's tolerance (no worse than eager
      itself is against a float64 run of the same model, where that is looser);
  (b) every foldable op is gone, every unfoldable one remains with its reason in the
      report; ops after the first one that stays are no candidates (not after a conv);
  (c) the graph lints and fake-tensor propagation agrees with ``meta["val"]``;
  (d) the user's parameters and buffers are bit-identical afterwards (and not written).
The oracle below classifies each op from the drawn shapes alone, not from fusepass code.
"""
from __future__ import annotations

import copy
import math
from collections import Counter
from typing import NamedTuple, Optional

import pytest
import torch
import torch.nn as nn
from hypothesis import given, note, settings
from hypothesis import strategies as st

import fusepass.pipeline
from fusepass.patterns import TABLE
from tests.util import TOL, examples, histogram, optimize

NO_FOLDS = ["fold_batchnorm", "fold_binary_constants", "fuse"]
OPS = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b,
       "mul": lambda a, b: a * b, "div": lambda a, b: a / b}
NAMES = list(OPS) + ["add_alpha", "rsub_fn"]  # torch.add(a, b, alpha=step.alpha), torch.rsub(y, c)
ALPHAS = [-1.5, 0.5, 2.0]
KINDS = ["scalar", "int_scalar", "zero_d", "channel", "channel_int", "non_channel", "enlarge",
         "promote", "nonfinite", "zero"]
REASONS = {"non_channel": "broadcasts along non-channel", "enlarge": "would enlarge",
           "promote": "dtype promotion", "nonfinite": "not finite"}
WIDER = {torch.float32: torch.float64, torch.bfloat16: torch.float32}
# kinds that fold (but zero in a divisor), by where the constant is
FOLDABLE = {"literal": ["scalar", "int_scalar", "zero"],
            "tensor": ["zero_d", "channel", "channel_int", "zero"]}


class Step(NamedTuple):
    name: str  # one of NAMES
    c_first: bool  # the constant is the left operand (rsub_fn: always on the right)
    literal: Optional[float]  # a number, or None: the step's buffer c<i>
    alpha: float = 1.0  # add_alpha's


def apply(step, v, c):
    """One step of the chain on the running value ``v`` and its constant ``c``."""
    a, b = (c, v) if step.c_first else (v, c)
    if step.name == "add_alpha":
        return torch.add(a, b, alpha=step.alpha)
    if step.name == "rsub_fn":
        return torch.rsub(v, c)  # c - v
    return OPS[step.name](a, b)


# The first step of a chain drawn for row fold.const.<family>.<spelling>: its spellings
# (name, constant first (None: drawn), constant form (None: drawn)), with a constant it folds.
FIRST = {
    "add": [("add", None, None)],
    "add_alpha_rev": [("add_alpha", True, None)],
    "sub": [("sub", False, None)],
    "rsub": [("sub", True, "tensor")],
    "rsub_scalar": [("sub", True, "literal"), ("rsub_fn", False, "literal")],
    "rsub_tensor": [("rsub_fn", False, "tensor")],
    "mul": [("mul", None, None)],
    "div": [("div", False, None)],
    "rdiv": [("div", True, "tensor")],  # never folds: declined, "not affine"
}
ROWS = [r.name for r in TABLE.select("fold.const.")]


def test_every_const_row_has_a_first_step():
    assert ROWS and {r.split(".")[3] for r in ROWS} == set(FIRST)


class Chain(nn.Module):
    """op(x), then ``steps`` (Step: the constant is ``literal`` or buffer c<i>)."""

    def __init__(self, op, steps, buffers, extra):
        super().__init__()
        self.op, self.steps, self.extra, self.record = op, steps, extra, None
        for i, c in buffers.items():
            self.register_buffer(f"c{i}", c)

    def forward(self, x):
        v, outs = self.op(x), []
        for i, step in enumerate(self.steps):
            if i == self.extra:
                outs.append(torch.relu(v))  # a second user of this step's input
            c = step.literal if step.literal is not None else getattr(self, f"c{i}")
            v = apply(step, v, c)
            if self.record is not None:
                self.record.append(v)
        return (v, *outs) if outs else v


@st.composite
def op_case(draw, row_family):
    """The op: for row family ``conv`` a conv (2 in 3) or a transposed conv, else a linear."""
    family = "linear" if row_family == "linear" else draw(
        st.sampled_from(["conv", "conv", "conv_transpose"]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    bias = draw(st.booleans())
    if family == "linear":
        cin, cout = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
        return family, nn.Linear(cin, cout, bias=bias), lead + (cin,), dtype, False
    rank, groups = draw(st.integers(1, 3)), draw(st.sampled_from([1, 2]))
    cin = groups * draw(st.integers(1, 2))
    cout = cin if draw(st.booleans()) else groups * draw(st.integers(1, 3))  # depthwise or not
    k, stride, dilation = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    lo = dilation * (k - 1) + 1
    size = draw(st.integers(lo, max(lo, 5 if rank < 3 else 3)))
    if family == "conv":
        padding = draw(st.integers(0, 1))
        cls = [nn.Conv1d, nn.Conv2d, nn.Conv3d][rank - 1]
        op = cls(cin, cout, k, stride, padding, dilation, groups, bias)
    else:  # the output (size-1)*stride - 2*padding + dilation*(k-1) + 1 must not be empty
        padding = draw(st.integers(0, 1 if (size - 1) * stride + dilation * (k - 1) > 1 else 0))
        cls = [nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d][rank - 1]
        op = cls(cin, cout, k, stride, padding, 0, groups, bias, dilation)
    channels_last = rank > 1 and draw(st.booleans())
    return family, op, (draw(st.integers(1, 2)), cin) + (size,) * rank, dtype, channels_last


def draw_constant(data, kind, name, y, channel, dtype, form=None):
    """(literal or None, tensor or None, the kind actually drawn) for one step; ``form``
    ("literal"/"tensor") decides where a kind could be either (zero, nonfinite)."""
    big = name in ("mul", "div")
    val = st.floats(0.5, 2.0) if big else st.floats(-2.0, 2.0)
    sign = data.draw(st.sampled_from([-1, 1]))

    def channel_tensor(dt, values=None):
        c = y.shape[channel]
        v = values if values is not None else torch.tensor(
            [data.draw(val) * data.draw(st.sampled_from([-1, 1])) for _ in range(c)], dtype=torch.float64)
        lead = data.draw(st.integers(0, channel))  # conv: [C,1,..] or [1,C,1,..]
        return v.to(dt).view([1] * lead + [c] + [1] * (y.dim() - 1 - channel))

    if kind == "non_channel":
        dims = [d for d in range(y.dim()) if d != channel and y.shape[d] > 1]
        if not dims:
            kind = "channel"
        else:
            d = data.draw(st.sampled_from(dims))
            shape = [1] * y.dim()
            shape[d] = y.shape[d]
            return None, (torch.rand(shape, dtype=torch.float64) + 0.5).to(dtype), kind
    if kind == "scalar":
        return sign * data.draw(val), None, kind
    if kind == "int_scalar":
        return sign * data.draw(st.integers(1, 3)), None, kind
    if kind == "zero_d":
        dt = data.draw(st.sampled_from([dtype, torch.float32, torch.float64]))
        return None, torch.tensor(sign * data.draw(val), dtype=dt), kind
    if kind == "channel":
        return None, channel_tensor(dtype), kind
    if kind == "channel_int":
        vals = torch.tensor([data.draw(st.sampled_from([-3, -2, -1, 1, 2, 3]))
                             for _ in range(y.shape[channel])])
        return None, channel_tensor(torch.int64, vals), kind
    if kind == "enlarge":
        return None, (torch.rand([2] + [1] * y.dim()) + 0.5).to(dtype), kind
    if kind == "promote":
        return None, channel_tensor(WIDER[dtype]), kind
    if kind == "nonfinite":
        bad = data.draw(st.sampled_from([math.inf, -math.inf, math.nan]))
        if form == "literal" or (form is None and data.draw(st.booleans())):
            return bad, None, kind
        c = channel_tensor(dtype)
        c.view(-1)[data.draw(st.integers(0, c.numel() - 1))] = bad
        return None, c, kind
    assert kind == "zero"
    if form == "literal" or (form is None and data.draw(st.booleans())):
        return 0.0, None, kind
    c = channel_tensor(dtype)
    c.view(-1)[data.draw(st.integers(0, c.numel() - 1))] = 0.0
    return None, c, kind


def expected(steps, kinds, extra, family):
    """The oracle: per step, "folded", ("declined", reason) or "stays" (no candidate)."""
    out, attached = [], True
    for i, ((name, c_first, literal, _), kind) in enumerate(zip(steps, kinds)):
        if not attached:
            out.append("stays")
            continue
        if name == "div" and c_first and literal is not None:
            out.append("stays")  # c / y with a number captures as reciprocal(y) * c
        elif i == extra:
            out.append(("declined", "has 2 users"))
        elif name == "div" and c_first:
            out.append(("declined", "not affine"))
        elif kind in REASONS:
            out.append(("declined", REASONS[kind]))
        elif kind == "zero" and name == "div":
            out.append(("declined", "division by zero"))
        else:
            out.append("folded")
        attached = out[-1] == "folded"
    return out


def captured_op(name, c_first, literal, alpha=1.0):
    """The ATen op a step captures to, and the fold.const row spelling that folds it."""
    if name == "sub" and c_first and literal is not None:
        return "aten.rsub", "rsub_scalar"
    if name == "sub" and c_first:
        return "aten.sub", "rsub"
    if name == "rsub_fn":
        return "aten.rsub", "rsub_scalar" if literal is not None else "rsub_tensor"
    if name == "add_alpha":
        return "aten.add", "add_alpha_rev" if c_first else "add"
    if name == "div" and c_first:  # with a tensor: declined; a number is no candidate
        return "aten.div", "rdiv"
    return f"aten.{name}", name


def snapshot(m):
    return {k: (v.clone(), v._version, v.data_ptr())
            for k, v in list(m.named_parameters()) + list(m.named_buffers())}


def assert_bit_identical(m, snap):
    now = dict(list(m.named_parameters()) + list(m.named_buffers()))
    assert now.keys() == snap.keys()
    for k, (v, version, ptr) in snap.items():
        assert (now[k]._version, now[k].data_ptr()) == (version, ptr), k
        torch.testing.assert_close(now[k], v, rtol=0, atol=0, equal_nan=True)


EPS = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -8}


def float64_run(m, x, eps=0.0, seed=0, sign=None):
    """The model in float64 (the truth, eps=0), or with every rounding a dtype-``eps``
    kernel may do injected as an absolute error eps*M, where M bounds the magnitudes an
    intermediate was computed from (|W|*|x| + |b| for the conv, then |a|*M + |d| along
    affine ops). Its spread tells how ill-conditioned an element is (``c / (y + d)`` near
    ``y = -d``): folding moves rounding points, so only that much agreement is owed."""
    g = torch.Generator().manual_seed(seed)
    m = copy.deepcopy(m).double()
    x = x.double()
    def jitter(v, mag):  # every element moved by eps*mag, all up, all down or at random
        s = sign if sign is not None else torch.randint(0, 2, v.shape, generator=g) * 2 - 1
        return v + eps * mag * s

    v = m.op(x)
    absop = copy.deepcopy(m.op)
    with torch.no_grad():
        for p in absop.parameters():
            p.abs_()
    mag = absop(x.abs())
    v, outs = jitter(v, mag), []
    for i, step in enumerate(m.steps):
        name, c_first, literal, alpha = step
        if i == m.extra:
            outs.append(torch.relu(v))
        c = literal if literal is not None else getattr(m, f"c{i}")
        ac = abs(c) if literal is not None else c.abs().double()
        v = apply(step, v, c)
        if name in ("add", "sub", "rsub_fn"):
            mag = mag + ac
        elif name == "add_alpha":
            mag = abs(alpha) * mag + ac if c_first else mag + abs(alpha) * ac
        elif name == "mul":
            mag = mag * ac
        elif not c_first:
            mag = mag / ac
        else:
            mag = v.abs()  # c / y: not affine, a fresh rounding of its result
        v = jitter(v, mag)
    return (v, *outs) if outs else v


def assert_close_to_eager(got, want, m, x, dtype, scale):
    """|got - eager| <= atol*scale + 4*(what dtype rounding can move each element by)."""
    truth = float64_run(m, x)
    moved = [float64_run(m, x, EPS[dtype], seed, sign) for seed, sign in enumerate([1, -1, None, None])]
    leaves = lambda v: torch.utils._pytree.tree_leaves(v)  # noqa: E731
    for k, (g, w, t) in enumerate(zip(leaves(got), leaves(want), leaves(truth))):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert torch.equal(torch.isfinite(g), torch.isfinite(w)), "non-finite elements differ"
        spread = torch.stack([(leaves(p)[k] - t).abs() for p in moved]).amax(0)
        fin = torch.isfinite(w) & torch.isfinite(t) & torch.isfinite(spread)
        err = (g.double() - w.double()).abs()[fin]
        bound = TOL[dtype][1] * scale + 4 * spread[fin] + 4 * (w.double() - t).abs()[fin]
        bad = err > bound
        assert not bad.any(), (f"error {err[bad].max():.3g} > allowed {bound[bad].min():.3g} "
                               f"(scale {scale:.3g})")


@pytest.mark.parametrize("row", ROWS)
@settings(max_examples=examples(11))
@given(data=st.data())
def test_folded_graph_properties(row, data):
    _, _, row_family, spelling = row.split(".")
    family, op, shape, dtype, channels_last = data.draw(op_case(row_family), label="op")
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    op.reset_parameters()  # drawn ops were initialized from the unseeded global RNG
    op = op.eval().to(dtype)
    x = torch.randn(shape).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    with torch.no_grad():
        y = op(x)
    channel = y.dim() - 1 if family == "linear" else 1
    n = data.draw(st.integers(1, 5), label="chain length")
    steps, buffers, kinds = [], {}, []
    for i in range(n):
        if i == 0:  # the row's own spelling, with a constant it folds
            name, c_first, form = data.draw(st.sampled_from(FIRST[spelling]), label="first step")
            c_first = data.draw(st.booleans()) if c_first is None else c_first
            form = form or data.draw(st.sampled_from(sorted(FOLDABLE)))
            kinds_ = [k for k in FOLDABLE[form] if not (k == "zero" and name == "div")]
            kind = data.draw(st.sampled_from(kinds_))
        else:
            name, form = data.draw(st.sampled_from(NAMES)), None
            c_first = name != "rsub_fn" and data.draw(st.booleans())
            kind = data.draw(st.sampled_from(KINDS))
        alpha = data.draw(st.sampled_from(ALPHAS)) if name == "add_alpha" else 1.0
        literal, tensor, kind = draw_constant(data, kind, name, y, channel, dtype, form)
        if tensor is not None:
            buffers[i] = tensor
        steps.append(Step(name, c_first, literal, alpha))
        kinds.append(kind)
        if tensor is not None and tuple(torch.broadcast_shapes(y.shape, tensor.shape)) != tuple(y.shape):
            y = torch.empty(torch.broadcast_shapes(y.shape, tensor.shape))  # enlarged
    # an extra user of the conv output itself would decline the row's own step
    extra = data.draw(st.sampled_from([None, None, *range(1, n)]), label="extra user")
    m = Chain(op, steps, buffers, extra).eval()
    note(f"steps {steps} kinds {kinds} extra {extra}")
    snap = snapshot(m)
    want_steps = expected(steps, kinds, extra, family)
    prefix = "fold.const.linear." if family == "linear" else "fold.const.conv."
    assert prefix + captured_op(*steps[0])[1] == row and \
        want_steps[0] == ("folded" if spelling != "rdiv" else ("declined", "not affine"))

    # (b) + (c): the IR after the fold passes (fuse and layout off — layout conversions are
    # propagate_layout's, tests/test_layout.py — reference lowering: plain ATen)
    base = histogram(optimize(m, [x], disable=[*NO_FOLDS, "propagate_layout"], lowering="reference"))
    gm = optimize(m, [x], disable=["fuse", "propagate_layout"], lowering="reference")
    after, report = histogram(gm), gm.fusepass_report
    folded = Counter(captured_op(*s)[0] for s, e in zip(steps, want_steps) if e == "folded")
    assert base - after == folded and not (after - base), (want_steps, base, after)
    rules = Counter(prefix + captured_op(*s)[1] for s, e in zip(steps, want_steps) if e == "folded")
    assert Counter(d.rule for d in report.where(stage="fold_binary_constants", action="rewritten")) == rules
    declines = report.where(stage="fold_binary_constants", action="declined")
    reasons = [e[1] for e in want_steps if isinstance(e, tuple)]
    assert len(declines) == len(reasons), (want_steps, declines)
    for d, reason in zip(declines, reasons):
        assert reason in d.reason, (want_steps, d)
    fusepass.pipeline.verify(gm)
    assert all("val" in nd.meta for nd in gm.graph.nodes if nd.op not in ("output",))

    # (a): the whole pipeline against eager, and eager against a float64 run
    full = optimize(m, [x])
    with torch.no_grad():
        m.record = []
        want = m(x)
        scale = max([1.0] + [v[torch.isfinite(v)].abs().max().item()
                             for v in m.record + [op(x)] if torch.isfinite(v).any()])
        m.record = None
        got, got_b = full(x), gm(x)
        assert_close_to_eager(got, want, m, x, dtype, scale)
        assert_close_to_eager(got_b, want, m, x, dtype, scale)

    # (d): nothing the user owns was written
    assert_bit_identical(m, snap)
