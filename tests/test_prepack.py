"""prepack_weights: weights reordered once into oneDNN's blocked format, correct at other
batch sizes, deduplicated when shared, reported with the bytes they add."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from tests.util import assert_close, needs_native_bf16, optimize

mkldnn = torch.ops.mkldnn


class Head(nn.Module):
    """conv-relu-conv-GAP-linear with no view: its optimized graph is batch-agnostic."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


class Shared(nn.Module):
    """One conv called twice; a second module tied to the same weight tensor."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.tied = nn.Conv2d(8, 8, 3, padding=1)
        self.tied.weight = self.c.weight

    def forward(self, x):
        y = torch.relu(self.c(torch.relu(self.c(x))))
        return self.tied(y)


def x_of(batch, c=3, size=8, fmt=torch.contiguous_format):
    g = torch.Generator().manual_seed(batch)
    return torch.randn(batch, c, size, size, generator=g).contiguous(memory_format=fmt)


def packed_buffers(gm) -> dict:
    """The prepacked weights the graph reads (constants of a finished graph are plain
    attributes, not buffers: fusepass.ir.pin_constants)."""
    consts = {n.target: getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    return {k: v for k, v in consts.items() if v.is_mkldnn}


def report_bytes(report) -> int:
    [info] = [d for d in report.where(stage="prepack_weights", action="info")]
    return int(re.search(r"\+([\d,]+) B", info.reason).group(1).replace(",", ""))


def test_weights_are_packed_and_the_report_shows_the_bytes():
    torch.manual_seed(0)
    m = Head().eval()
    opt = optimize(m, [x_of(1)])
    packed = packed_buffers(opt)
    assert len(packed) == 3  # two convs, one linear
    rep = opt.fusepass_report
    assert rep.rewrites["prepack.conv"] == 2 and rep.rewrites["prepack.linear"] == 1
    assert report_bytes(rep) == sum(mkldnn._nbytes(t) for t in packed.values()) > 0
    # the dense weights are no longer held by the graph
    assert not any(n.op == "get_attr" and not getattr(opt, n.target).is_mkldnn
                   and getattr(opt, n.target).dim() == 4 for n in opt.graph.nodes)


def test_batch1_graph_stays_correct_at_batch8():
    torch.manual_seed(0)
    m = Head().eval()
    opt = optimize(m, [x_of(1)])
    x8 = x_of(8)
    with torch.no_grad():
        want = m(x8)
        assert_close(opt(x8), want)  # through the runtime's per-shape variants
        # and the batch-1 graph itself, packed for batch 1, run directly at batch 8
        assert packed_buffers(opt)
        assert_close(opt.forward(x8), want)


def test_batch1_to_batch8_through_torch_compile():
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = Head().eval()
    compiled = torch.compile(m, backend="fusepass")
    with torch.no_grad():
        for bs in (1, 8):
            assert_close(compiled(x_of(bs)), m(x_of(bs)))
    torch._dynamo.reset()


def test_resnet_batch1_to_batch8():
    from bench import zoo as models
    m = models.build("resnet18")
    opt = optimize(m, [models.example_input("resnet18", 1, 64)])
    x8 = models.example_input("resnet18", 8, 64)
    with torch.no_grad():
        assert_close(opt(x8), m(x8))


def test_shared_weight_is_packed_once():
    torch.manual_seed(0)
    m = Shared().eval()
    x = x_of(2, c=8)
    opt = optimize(m, [x])
    packed = packed_buffers(opt)
    assert len(packed) == 1, list(packed)
    convs = [n for n in opt.graph.nodes if n.op == "call_function"
             and str(n.target).startswith("mkldnn._convolution_pointwise")]
    assert len(convs) == 3 and len({c.args[1].target for c in convs}) == 1
    rewritten = opt.fusepass_report.where(stage="prepack_weights", action="rewritten")
    assert [d.reason.endswith(f"shared with {i} earlier node(s)") for i, d in enumerate(rewritten)] == [
        False, True, True]
    assert report_bytes(opt.fusepass_report) == mkldnn._nbytes(next(iter(packed.values())))
    with torch.no_grad():
        assert_close(opt(x), m(x))


def test_disable_prepack_weights():
    torch.manual_seed(0)
    m = Head().eval()
    x = x_of(2)
    opt = optimize(m, [x], disable=["prepack_weights"])
    assert packed_buffers(opt) == {}
    assert opt.fusepass_report.where(stage="prepack_weights") == []
    with torch.no_grad():
        assert_close(opt(x), m(x))


def test_nchw_convs_keep_dense_weights_without_layout():
    """With a packed weight oneDNN returns NHWC for NCHW input: such convs are declined,
    so the layout eager gives is kept (outputs' strides included)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    x = x_of(2)
    opt = optimize(m, [x], disable=["propagate_layout"])
    declined = opt.fusepass_report.where(stage="prepack_weights", action="declined")
    assert len(declined) == 2 and all("NCHW conv" in d.reason for d in declined)
    assert packed_buffers(opt) == {}
    with torch.no_grad():
        got, want = opt(x), m(x)
    assert_close(got, want)
    assert got.stride() == want.stride()


def test_reference_lowering_has_nothing_to_pack():
    torch.manual_seed(0)
    m = Head().eval()
    opt = optimize(m, [x_of(2)], lowering="reference")
    assert packed_buffers(opt) == {}
    assert opt.fusepass_report.where(stage="prepack_weights") == []


@needs_native_bf16
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_bf16_packed(fmt):
    torch.manual_seed(0)
    m = Head().eval().to(torch.bfloat16)
    x = x_of(2, fmt=fmt).to(torch.bfloat16)
    opt = optimize(m, [x])
    assert len(packed_buffers(opt)) == 3
    with torch.no_grad():
        assert_close(opt(x), m(x), dtype=torch.bfloat16)
