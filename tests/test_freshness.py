"""Folded weights never go stale (pytorch#104984): after a source parameter or buffer
changes -- in place, through ``load_state_dict``, by replacing the Parameter object, or
by a training-mode BatchNorm step that updates running stats -- the next call of the
compiled model again matches eager, through ``optimize`` and through the backend."""
from __future__ import annotations

import gc

import pytest
import torch
import torch.nn as nn

import fusepass
from tests.util import assert_close


class ConvBNChain(nn.Module):
    """conv -> BN -> *k -> +1: every weight below is folded into one conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.register_buffer("k", torch.rand(6, 1, 1) + 0.5)
        reinit(self)

    def forward(self, x):
        return self.bn(self.conv(x)) * self.k + 1.0


def reinit(m, seed=0):
    """Non-trivial BN statistics and weights, so outputs are O(1), not ~0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.5 + (name.endswith(".weight") and 0.5))
    return m


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def via_optimize(m):
    """optimize() takes a GraphModule: that is the model whose weights change."""
    traced = torch.fx.symbolic_trace(m)
    with torch.no_grad():
        gm = fusepass.optimize(traced, [X])
    assert gm.fusepass_report.counts.get("fold.bn.conv") == 1, gm.fusepass_report
    return traced, gm


def via_backend(m):
    torch._dynamo.reset()
    return m, torch.compile(m, backend="fusepass")


def in_place_weight(m):
    with torch.no_grad():
        m.conv.weight.mul_(2)


def in_place_bias(m):
    with torch.no_grad():
        m.conv.bias.add_(1)


def in_place_bn_weight(m):
    with torch.no_grad():
        m.bn.weight.mul_(-1)


def in_place_running_stats(m):
    with torch.no_grad():
        m.bn.running_mean.add_(1)
        m.bn.running_var.mul_(3)


def in_place_constant_buffer(m):
    with torch.no_grad():
        m.k.mul_(-2)


def load_state_dict(m):
    m.load_state_dict(reinit(ConvBNChain(), seed=7).state_dict())


def load_state_dict_assign(m):
    m.load_state_dict(reinit(ConvBNChain(), seed=8).state_dict(), assign=True)


def replace_parameter(m):
    m.conv.weight = nn.Parameter(torch.randn_like(m.conv.weight))


def replace_parameter_freeing_the_old(m):
    """The old weight is freed first, so the allocator may hand its address (and version
    0) to the new one: (data_ptr, _version) alone would not see the change."""
    shape = m.conv.weight.shape
    del m.conv.weight
    gc.collect()
    m.conv.weight = nn.Parameter(torch.randn(shape))


def replace_parameter_at_the_same_address_and_version(m):
    """What an allocator handing a freed weight's memory to its replacement looks like,
    made deterministic: a new Parameter object at the old address, with the old version
    number and new values. Only the object's identity tells it apart."""
    old = m.conv.weight
    new = nn.Parameter(old.data)  # same storage, its own version counter
    new.data.copy_(torch.randn_like(old))  # .data writes bump no version
    with torch.no_grad():
        while new._version < old._version:
            new.mul_(1)
    assert (new.data_ptr(), new._version) == (old.data_ptr(), old._version)
    m.conv.weight = new


def bn_training_step(m):
    """BatchNorm's running stats are updated by native_batch_norm without a version bump."""
    m.train()
    with torch.no_grad():
        m(torch.randn(4, 3, 8, 8) * 3 + 1)
    m.eval()


def no_grad_data_copy(m):
    with torch.no_grad():
        m.bn.bias.copy_(torch.randn_like(m.bn.bias))


CHANGES = [in_place_weight, in_place_bias, in_place_bn_weight, in_place_running_stats,
           in_place_constant_buffer, load_state_dict, load_state_dict_assign,
           replace_parameter, replace_parameter_freeing_the_old,
           replace_parameter_at_the_same_address_and_version, bn_training_step,
           no_grad_data_copy]


@pytest.mark.parametrize("compile_", [via_optimize, via_backend], ids=["optimize", "backend"])
@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__)
def test_output_matches_eager_after_a_source_weight_changes(compile_, change):
    m, compiled = compile_(ConvBNChain().eval())
    with torch.no_grad():
        before = m(X)
        assert_close(compiled(X), before)
        change(m)
        after = m(X)
        assert (after - before).abs().max() > 0.1, "the change must change the output"
        assert_close(compiled(X), after)
        assert_close(compiled(X), after)  # and stays fresh on the next call


@pytest.mark.parametrize("compile_", [via_optimize, via_backend], ids=["optimize", "backend"])
def test_repeated_changes_are_each_seen(compile_):
    m, compiled = compile_(ConvBNChain().eval())
    with torch.no_grad():
        for i in range(3):
            in_place_weight(m)
            in_place_running_stats(m)
            assert_close(compiled(X), m(X))


def test_unchanged_weights_do_not_rebuild():
    m, gm = via_optimize(ConvBNChain().eval())
    compiled = gm.__dict__["_fusepass"]
    with torch.no_grad():
        for _ in range(3):
            gm(X)
    assert not compiled.history.decisions
    in_place_weight(m)
    with torch.no_grad():
        gm(X)
        gm(X)
    assert len(compiled.history.decisions) == 1


def test_folded_graph_holds_no_alias_of_a_user_tensor():
    """The folded constants are new tensors: writing them could never reach the user."""
    m, gm = via_optimize(ConvBNChain().eval())
    user = {t.untyped_storage().data_ptr() for t in list(m.parameters()) + list(m.buffers())}
    consts = [getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"]
    assert consts and all(c.untyped_storage().data_ptr() not in user for c in consts)


def test_stats_watch_compares_bitwise_and_sees_every_write():
    """The per-call BatchNorm-statistics check: reads live memory (no copy) for contiguous
    means, copies a strided one per call, compares bits (a NaN equals itself, -0.0 does
    not equal 0.0), and snapshots each tensor when it is added, not on first check."""
    from fusepass.runtime import StatsWatch
    dense = torch.tensor([1.0, float("nan"), 0.0])
    strided = torch.arange(8.0)[::2]  # not one contiguous block
    full = [dense, strided]
    watch = StatsWatch()
    watch.add(0, dense)
    watch.add(1, strided)
    watch.add(0, dense)  # a second add of the same arg is a no-op
    dense[2] = -0.0  # written after add, before the first check: must be seen
    assert not watch.unchanged()
    dense[2] = 0.0
    assert watch.unchanged() and watch.unchanged()  # NaN included, unchanged
    strided[1] += 1
    assert not watch.unchanged()
    strided[1] -= 1
    assert watch.unchanged()
    assert StatsWatch().unchanged()  # nothing watched: nothing to see


@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__)
def test_weights_dynamo_installs_as_graph_attributes_stay_fresh(change):
    """With Inductor's freezing flag on (a process that also compiles with Inductor, say),
    Dynamo gives every backend a graph that holds parameters and buffers as ``get_attr``
    instead of lifted inputs. fusepass folds them all the same and watches them by
    reference: an in-place update or a BatchNorm training step is seen (it used to serve
    the stale folded weights), a replaced Parameter makes Dynamo recompile."""
    import torch._inductor.config as inductor_config  # a ConfigModule: patch, not monkeypatch
    with inductor_config.patch(freezing=True), torch.no_grad():
        m, compiled = via_backend(ConvBNChain().eval())
        before = m(X)
        assert_close(compiled(X), before)
        rep = fusepass.explain(m, X)
        assert rep.counts.get("fold.bn.conv") == 1, rep
        assert any("graph attributes" in d.reason for d in rep.decisions), rep
        change(m)
        after = m(X)
        assert (after - before).abs().max() > 0.1, "the change must change the output"
        assert_close(compiled(X), after)
        assert_close(compiled(X), after)


def test_graph_attribute_weights_that_require_grad_are_not_frozen():
    """prepare_freezing makes Dynamo install parameters as graph attributes even with
    grad on: they must count as grad-requiring tensors, so nothing is frozen and the
    gradient reaches the parameters."""
    torch._dynamo.reset()
    m = ConvBNChain().eval()
    with torch._dynamo.config.patch(prepare_freezing=True):
        y = torch.compile(m, backend="fusepass")(X)
    y.square().sum().backward()
    got = m.conv.weight.grad.clone()
    m.zero_grad()
    m(X).square().sum().backward()
    assert got.abs().max() > 0
    assert_close(got, m.conv.weight.grad)


def compiled_instances(n):
    """``n`` instances of one module class, each through torch.compile(backend=
    "fusepass"): Dynamo traces them into one graph, so one Compiled serves them all
    (returned, spied from the backend)."""
    from fusepass.backend import fusepass_backend
    torch._dynamo.reset()
    seen = []

    def spy(gm, example_inputs):
        seen.append(fusepass_backend(gm, example_inputs))
        return seen[-1]

    models = [reinit(ConvBNChain().eval(), seed=i) for i in range(n)]
    fns = [torch.compile(m, backend=spy) for m in models]
    with torch.no_grad():
        for f in fns:
            f(X)
    assert len(seen) == 1, "Dynamo gave each instance a graph of its own: nothing to test"
    return models, fns, seen[0]


def test_instances_of_one_module_class_get_a_variant_each():
    """Two ResNet-50s in one process ran at 570 ms a call instead of 26: each call
    found the other instance's weights, rebuilt, and dropped the other's variant."""
    models, fns, compiled = compiled_instances(2)
    with torch.no_grad():
        wants = [m(X) for m in models]
        assert (wants[0] - wants[1]).abs().max() > 0.1  # different weights, different outputs
        for _ in range(3):
            for f, want in zip(fns, wants):
                assert_close(f(X), want)
    assert compiled.builds == 2 and len(compiled.variants) == 2
    assert not [d for d in compiled.history.decisions if "changed since folding" in d.reason]
    assert any("another set of weights" in d.reason for d in compiled.history.decisions)


def test_a_weight_change_rebuilds_that_instance_only():
    models, fns, compiled = compiled_instances(2)
    with torch.no_grad():
        in_place_weight(models[0])
        for f, m in zip(fns, models):
            assert_close(f(X), m(X))
        assert compiled.builds == 3  # instance 0 rebuilt, instance 1's variant kept
        replace_parameter(models[1])
        for _ in range(2):
            for f, m in zip(fns, models):
                assert_close(f(X), m(X))
    assert compiled.builds == 4 and len(compiled.variants) == 2


def test_weight_sets_are_bounded():
    from fusepass.runtime import MAX_WEIGHT_SETS
    models, fns, compiled = compiled_instances(MAX_WEIGHT_SETS + 2)
    assert len(compiled.variants) == MAX_WEIGHT_SETS
    assert sum("weight sets called this graph" in d.reason for d in compiled.history.decisions) == 2
    with torch.no_grad():  # the dropped ones are built again, correctly
        for f, m in zip(fns, models):
            assert_close(f(X), m(X))
