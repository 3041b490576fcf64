"""``torch.compile(..., dynamic=True)`` optimizes as static shapes do (issue 14, item 5).

Dynamo hands module floats (BatchNorm's eps and momentum, LayerNorm's eps) over as 0-d
tensors under dynamic=True and ``.item()``s them in the graph; capture specializes them
by value and the runtime keys the variant by those values. Each test compares the report
with the static-shape compile of the same model, so a fallback or a lost fusion fails."""
import pytest
import torch
from torch import nn

from fusepass.backend import fusepass_backend
from tests.util import assert_close, tiny_bert


def compiled(model, dynamic):
    seen = []

    def backend(gm, example_inputs):
        c = fusepass_backend(gm, example_inputs)
        seen.append(c)
        return c
    torch._dynamo.reset()
    return torch.compile(model, backend=backend, dynamic=dynamic), seen


def counts(seen) -> dict:
    out: dict = {}
    for c in seen:
        for v in c.variants.values():
            for k, n in v.report.counts.items():
                out[k] = max(out.get(k, 0), n)
    return out


def test_resnet_with_dynamic_shapes_fuses_like_static():
    from bench import zoo
    m = zoo.build("resnet18")
    with torch.no_grad():
        static, s_seen = compiled(m, dynamic=False)
        static(zoo.example_input("resnet18", 2, resolution=64))
        dyn, d_seen = compiled(m, dynamic=True)
        for bs, res in [(1, 64), (3, 64), (2, 96)]:
            x = zoo.example_input("resnet18", bs, resolution=res)
            assert_close(dyn(x), m(x))
    want = counts(s_seen)
    assert want["fold.bn.conv"] == 20 and want["conv2d.relu"] > 0
    assert counts(d_seen) == want
    assert any(c.scalars for c in d_seen), "BatchNorm's eps/momentum were not specialized"


def test_a_changed_batchnorm_eps_rebuilds_under_dynamic_shapes():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    m[1].running_mean.uniform_(-1, 1)
    m[1].running_var.uniform_(0.01, 0.5)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        dyn, seen = compiled(m, dynamic=True)
        assert_close(dyn(x), m(x))
        m[1].eps = 0.3  # Dynamo recompiles; a variant keyed by the old value must not serve
        assert_close(dyn(x), m(x))
    assert counts(seen) == {"fold.bn.conv": 1, "conv2d.relu": 1}
    assert sum(c.builds for c in seen) == 2


def test_bert_with_dynamic_sequence_length_fuses_like_static():
    bert = tiny_bert(2)
    with torch.no_grad():
        static, s_seen = compiled(bert, dynamic=False)
        static(torch.randint(0, 100, (1, 8)))
        dyn, d_seen = compiled(bert, dynamic=True)
        for bs, seq in [(1, 8), (2, 13), (3, 5)]:
            ids = torch.randint(0, 100, (bs, seq))
            assert_close(dyn(ids).last_hidden_state, bert(ids).last_hidden_state)
    want = counts(s_seen)
    assert want, "the static compile fused nothing: the comparison would be vacuous"
    assert counts(d_seen) == want


def test_a_number_read_from_a_0d_input_keys_the_variant():
    import fusepass

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x, s):
            return torch.relu(self.conv(x)) * s.item()
    m = M().eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        opt = fusepass.optimize(m, [x, torch.tensor(2.0)])
        for s in (2.0, 3.0, 2.0):
            assert_close(opt(x, torch.tensor(s)), m(x, torch.tensor(s)))
    c = opt._fusepass
    assert len(c.variants) == 2 and c.builds == 2
