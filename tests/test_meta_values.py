"""A loaded graph's values are plain meta tensors (fusepass/ir: ``value_mode``); what the
target stages compute on them must be what a FakeTensorMode computes on a captured
graph's. Expected values come from torch: its own ``suggest_memory_format`` and
FakeTensorMode propagation."""
from __future__ import annotations


import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._prims_common import suggest_memory_format as torch_suggest
from torch._subclasses.fake_tensor import FakeTensorMode

from fusepass import ir
from tests.util import examples

aten = torch.ops.aten


def _laid_out(shape, perm, expand_dim=None):
    """An empty tensor of ``shape`` whose memory order is ``perm`` (optionally with one dim
    broadcast: stride 0)."""
    t = torch.empty([shape[i] for i in perm]).permute([perm.index(i) for i in range(len(shape))])
    if expand_dim is not None:
        s = list(shape)
        s[expand_dim] = 1
        t = torch.empty(s).expand(*shape)
    return t


@settings(max_examples=examples(60), deadline=None)
@given(dims=st.lists(st.integers(0, 4), min_size=3, max_size=5), data=st.data())
def test_suggest_memory_format_is_torchs(dims, data):
    perm = data.draw(st.permutations(range(len(dims))))
    expand = data.draw(st.none() | st.integers(0, len(dims) - 1))
    t = _laid_out(dims, perm, expand)
    assert ir.suggest_memory_format(t) == torch_suggest(t)


def _meta(t):
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


@settings(max_examples=examples(40), deadline=None)
@given(n=st.integers(1, 2), c=st.sampled_from([1, 3, 8]), hw=st.integers(1, 9),
       k=st.sampled_from([1, 3]), groups=st.sampled_from([1, "depthwise"]),
       x_cl=st.booleans(), w_cl=st.booleans(), bias=st.booleans(), conv1d=st.booleans())
def test_a_meta_convolution_has_the_fake_tensors_layout(n, c, hw, k, groups, x_cl, w_cl, bias,
                                                         conv1d):
    """``run_on_values`` on the meta device gives aten.convolution the strides
    FakeTensorMode (the CPU kernel's backend choice) gives it."""
    g = c if groups == "depthwise" else 1
    out_c = c if g > 1 else 4
    x = torch.empty(n, c, hw, hw)
    w = torch.empty(out_c, c // g, k, k)
    if conv1d:
        x, w = x[..., 0], w[..., 0]
    else:
        x = x.to(memory_format=torch.channels_last) if x_cl else x
        w = w.to(memory_format=torch.channels_last) if w_cl else w
    b = torch.empty(out_c) if bias else None
    nd = x.dim() - 2
    rest = [[1] * nd, [k // 2] * nd, [1] * nd, False, [0] * nd, g]
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = [None if t is None else mode.from_tensor(t, static_shapes=True) for t in (x, w, b)]
    want = ir.run_on_values(mode, aten.convolution.default, (*fake, *rest), {})
    got = ir.run_on_values(ir.META, aten.convolution.default,
                           (*(None if t is None else _meta(t) for t in (x, w, b)), *rest), {})
    assert got.is_meta and (got.shape, got.stride()) == (want.shape, want.stride())


def test_value_mode_tells_the_two_kinds_apart():
    import torch.fx as fx
    for make, kind in [(lambda t: FakeTensorMode().from_tensor(t), FakeTensorMode),
                       (_meta, torch.device)]:
        g = fx.Graph()
        p = g.placeholder("x")
        p.meta["val"] = make(torch.empty(2, 3))
        g.output(p)
        gm = fx.GraphModule(torch.nn.Module(), g)
        assert isinstance(ir.value_mode(gm), kind)
        assert ir.is_cpu_value(p.meta["val"])
    # a fake tensor *of a meta tensor* is a captured graph's value on the meta device
    assert not ir.is_cpu_value(FakeTensorMode().from_tensor(torch.empty(2, device="meta")))
