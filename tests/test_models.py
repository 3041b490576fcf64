"""Tests for bench.zoo: the torchvision look-alikes used by the demo,
tests and benchmarks. They must match torchvision's architectures (checked through
parameter counts and state_dict key names), be deterministic, and have sane numerics
(no ~0 outputs, no denormals) after ``reinit_``."""
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.fx

from bench import zoo as models

# torchvision's own numbers (sum(p.numel() for p in model.parameters()), 1000 classes)
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "mobilenet_v3_small": 2_542_856,
    "mobilenet_v3_large": 5_483_032,
    "efficientnet_b0": 5_288_548,
}
# a few torchvision state_dict keys per model, so pretrained weights would load as-is
TORCHVISION_KEYS = {
    "resnet18": ["layer2.0.downsample.1.running_var", "layer4.1.bn2.weight", "fc.bias"],
    "resnet50": ["layer1.0.downsample.0.weight", "layer4.2.bn3.running_var", "fc.weight"],
    "mobilenet_v3_small": ["features.1.block.1.fc2.bias", "features.12.1.weight",
                           "classifier.3.weight"],
    "mobilenet_v3_large": ["features.4.block.2.fc1.weight", "features.16.0.weight",
                           "classifier.0.bias"],
    "efficientnet_b0": ["features.1.0.block.1.fc1.weight", "features.6.3.block.3.1.weight",
                        "features.8.0.weight", "classifier.1.weight"],
}
RES = 64  # every model here is fully convolutional + adaptive pooling, so 64x64 is fine

NAMES = sorted(models.MODELS)


def test_model_table_complete():
    assert set(NAMES) == set(TORCHVISION_PARAMS)


@pytest.mark.parametrize("name", NAMES)
def test_param_count_and_names_match_torchvision(name):
    model = models.MODELS[name]()
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS[name]
    keys = set(model.state_dict())
    for key in TORCHVISION_KEYS[name]:
        assert key in keys, key


@pytest.mark.parametrize("name", NAMES)
def test_build_forward_sane_and_deterministic(name):
    rng_before = torch.get_rng_state()
    a, b = models.build(name), models.build(name)
    assert torch.equal(torch.get_rng_state(), rng_before), "build must not touch global RNG"
    assert not a.training
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

    tiny = []  # count denormals in every intermediate activation

    def hook(mod, args, out):
        if isinstance(out, torch.Tensor):
            absval = out.detach().abs()
            tiny.append(int(((absval > 0) & (absval < torch.finfo(out.dtype).tiny)).sum()))

    handles = [m.register_forward_hook(hook) for m in a.modules()]
    x = models.example_input(name, 2, RES)
    assert torch.equal(x, models.example_input(name, 2, RES))
    with torch.no_grad():
        ya = a(x)
        yb = b(x)
    for h in handles:
        h.remove()

    assert ya.shape == (2, 1000)
    assert torch.isfinite(ya).all()
    assert ya.std() > 0.05, "deep net output collapsed towards 0"
    assert ya.abs().max() < 1e3, "activations blew up"
    assert not torch.allclose(ya[0], ya[1]), "output ignores the input"
    assert sum(tiny) == 0, "denormals in intermediate activations"
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_batchnorm_stats_randomised(name):
    model = models.build(name)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert 0.5 <= bn.running_var.min() and bn.running_var.max() <= 1.5
        assert 0.5 <= bn.weight.min() and bn.weight.max() <= 1.5  # no zero-init gammas
        assert bn.running_mean.abs().max() > 0 and bn.bias.abs().max() > 0


def test_seed_changes_weights():
    a, b = models.build("mobilenet_v3_small"), models.build("mobilenet_v3_small", seed=1)
    assert not torch.equal(a.classifier[0].weight, b.classifier[0].weight)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0"])
def test_num_classes_and_fx_traceable(name):
    model = models.build(name, num_classes=10)
    gm = torch.fx.symbolic_trace(model)
    x = models.example_input(name, 2, RES)
    with torch.no_grad():
        y = model(x)
        torch.testing.assert_close(gm(x), y)
    assert y.shape == (2, 10)


def test_full_resolution_resnet50():
    model = models.build("resnet50")
    x = models.example_input("resnet50", 1)
    assert x.shape == (1, 3, 224, 224)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 1000) and torch.isfinite(y).all() and 0.1 < y.std() < 100


def test_unknown_model():
    with pytest.raises(KeyError):
        models.build("vgg16")
    with pytest.raises(KeyError):
        models.example_input("vgg16", 1)


def test_import_pulls_in_nothing_but_torch():
    code = ("import sys; before = set(sys.modules); import bench.zoo; "
            "bad = sorted(m for m in set(sys.modules) - before if "
            "m.split('.')[0] in ('torchvision', 'transformers', 'timm', 'fusepass')); "
            "assert not bad, bad")
    root = pathlib.Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
