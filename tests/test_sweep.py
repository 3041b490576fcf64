"""A real-model sweep: architectures fusepass was not written for, through the backend
and through ``optimize``. For each: no exception, outputs within tolerance of eager on
two different inputs, and the report lists what fused.

Small configs keep this within CI's budget; ``make sweep`` (FUSEPASS_SWEEP=large) runs
larger configs of the same architectures.
"""
from __future__ import annotations

import os

import pytest
import torch

import fusepass
from bench import zoo as models
from fusepass.backend import fusepass_backend

T = pytest.importorskip("transformers", reason="the sweep builds transformers models from configs")

LARGE = os.environ.get("FUSEPASS_SWEEP") == "large"
H = 256 if LARGE else 64  # hidden size
L = 4 if LARGE else 2  # layers
TXT = dict(vocab_size=1000, hidden_size=H, num_hidden_layers=L, num_attention_heads=4,
           intermediate_size=2 * H)
IMG = 64 if LARGE else 32


def _hf(cls, cfg):
    return lambda: cls(cfg)


ARCHS = {
    # name: (builder, input kind)
    "bert": (_hf(T.BertModel, T.BertConfig(**TXT)), "ids"),
    "roberta": (_hf(T.RobertaModel, T.RobertaConfig(**TXT)), "ids"),
    "distilbert": (_hf(T.DistilBertModel, T.DistilBertConfig(vocab_size=1000, dim=H, n_layers=L, n_heads=4, hidden_dim=2 * H)), "ids"),
    "albert": (_hf(T.AlbertModel, T.AlbertConfig(embedding_size=32, **TXT)), "ids"),
    "gpt2": (_hf(T.GPT2Model, T.GPT2Config(vocab_size=1000, n_embd=H, n_layer=L, n_head=4, use_cache=False)), "ids"),
    "t5_encoder": (_hf(T.T5EncoderModel, T.T5Config(vocab_size=1000, d_model=H, d_kv=16, d_ff=2 * H, num_layers=L, num_heads=4)), "ids"),
    "bart": (_hf(T.BartModel, T.BartConfig(vocab_size=1000, d_model=H, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=2 * H, decoder_ffn_dim=2 * H, use_cache=False)), "ids"),
    "vit": (_hf(T.ViTModel, T.ViTConfig(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, intermediate_size=2 * H, image_size=IMG, patch_size=8)), "img"),
    "swin": (_hf(T.SwinModel, T.SwinConfig(image_size=IMG, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4)), "img"),
    "convnext": (_hf(T.ConvNextModel, T.ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])), "img64"),
    "hf_resnet": (_hf(T.ResNetModel, T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])), "img64"),
    "mobilevit": (_hf(T.MobileViTModel, T.MobileViTConfig(image_size=64)), "img64"),
    "resnet18": (lambda: models.build("resnet18"), "img64"),
    "mobilenet_v3_small": (lambda: models.build("mobilenet_v3_small"), "img64"),
    "efficientnet_b0": (lambda: models.build("efficientnet_b0"), "img64"),
}


def sane(model):
    """HF keeps std-0.02 init: deep nets then output ~0. Reset to PyTorch defaults."""
    torch.manual_seed(0)
    for mod in model.modules():
        if hasattr(mod, "reset_parameters") and mod.__class__.__module__.startswith("torch.nn"):
            mod.reset_parameters()
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    return model.eval()


def inputs(kind, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "ids":
        return torch.randint(0, 1000, (2, 16), generator=g)
    size = 64 if kind == "img64" else IMG
    return torch.randn(2, 3, size, size, generator=g)


def leaves(out):
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def assert_outputs_close(got, want):
    got, want = leaves(got), leaves(want)
    assert len(got) == len(want) and want
    for g, w in zip(got, want):
        if w.is_floating_point():
            scale = max(w.abs().max().item(), 1e-3)
            assert (g - w).abs().max().item() <= 1e-4 * scale + 1e-5, (g - w).abs().max()
            assert w.abs().max() > 1e-3, "model output ~0: re-initialize it"
        else:
            assert torch.equal(g, w)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_backend(name):
    build, kind = ARCHS[name]
    model = sane(build())
    compiled_graphs = []

    def spy(gm, example_inputs):
        c = fusepass_backend(gm, example_inputs)
        compiled_graphs.append(c)
        return c

    compiled = torch.compile(model, backend=spy)
    with torch.no_grad():
        for seed in (0, 1):
            x = inputs(kind, seed)
            assert_outputs_close(compiled(x), model(x))
    reports = [v.report for c in compiled_graphs for v in c.variants.values()]
    assert reports and not any(r.fell_back for r in reports), [r.summary() for r in reports]
    kernels = sum((sum(r.kernels.values()) for r in reports))
    assert kernels > 0, [r.summary() for r in reports]


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_optimize(name):
    build, kind = ARCHS[name]
    model = sane(build())
    x0 = inputs(kind, 0)
    with torch.no_grad():
        gm, _ = torch._dynamo.export(model)(x0)
        opt = fusepass.optimize(gm, [x0])
        assert not opt.fusepass_report.fell_back, opt.fusepass_report.summary()
        assert opt.fusepass_report.kernels, opt.fusepass_report.summary()
        for seed in (0, 1):
            x = inputs(kind, seed)
            assert_outputs_close(opt(x), model(x))
