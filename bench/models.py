"""The benchmark's models: conv nets from the package, transformers from configs.

Why this exists: the bench must compare compilers on realistic graphs without any
download. Conv nets come from :mod:`bench.zoo` (torchvision look-alikes with sane
random weights); BERT-base and ViT-base are built by ``transformers`` from their
default configs. HF's own init (std 0.02 everywhere) leaves every Linear shrinking
its input ~2x, so attention is near-uniform and the residual stream is dominated by
embeddings: a poor subject for numerics. :func:`reinit_transformer_` makes it realistic
(variance-preserving Linears, non-trivial LayerNorms), and :func:`check_output` refuses
to time a model whose output is ~0 or not finite.

This module must import under torch 2.8 too (the IPEX environment runs the same
workers), so it uses nothing newer than that and imports transformers lazily.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Tuple

import torch
from torch import nn

from bench import zoo  # plain torch: imports in the IPEX env (torch 2.8) too

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # "cnn" (4-D activations: channels_last applies) or "transformer"
    description: str
    build: Callable[..., nn.Module]  # (seed, attn) -> eval module returning a tensor/tuple
    inputs: Callable[..., Tuple[torch.Tensor, ...]]  # (batch, seed) -> positional inputs


# ------------------------------------------------------------------------ conv nets
def _cnn(name: str, description: str) -> ModelSpec:
    def build(seed: int = 0, attn: str = "sdpa") -> nn.Module:
        return zoo.build(name, seed)

    def inputs(batch: int, seed: int = 0):
        return (zoo.example_input(name, batch, 224, seed=seed + 100),)

    return ModelSpec(name, "cnn", description, build, inputs)


class TinyNet(nn.Module):
    """The smoke-test model: conv-BN-ReLU, a residual block, SE-style gating, a Linear.
    Small enough that every config (Inductor included) compiles in seconds."""

    def __init__(self, c: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.conv1 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c, 1), nn.Hardsigmoid())
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.stem(x)
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        x = torch.relu(x + y)
        x = x * self.se(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _build_tiny(seed: int = 0, attn: str = "sdpa") -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyNet()
    calib = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
    return zoo.reinit_(model, seed, calib).eval()


def _tiny_inputs(batch: int, seed: int = 0):
    return (torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 100)),)


# ---------------------------------------------------------------------- transformers
class HFOutputs(nn.Module):
    """Calls an HF model positionally and returns ``(last_hidden_state, pooler_output)``:
    plain tensors for torch.jit.trace, and the pooler stays live for every compiler."""

    def __init__(self, model: nn.Module, input_name: str):
        super().__init__()
        self.model, self.input_name = model, input_name

    def forward(self, x):
        out = self.model(**{self.input_name: x}, return_dict=True)
        return out.last_hidden_state, out.pooler_output


@torch.no_grad()
def reinit_transformer_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-initialise an HF transformer in place, deterministically, leaving the global
    RNG untouched: every ``reset_parameters()`` runs, then Linear/Conv weights get
    N(0, 1/fan_in) (variance preserving; query/key get twice that std, so the attention
    logits q.k/sqrt(d) have std ~4 and softmax is far from uniform), biases N(0, 0.02), LayerNorm weight U(0.8, 1.2) and bias N(0, 0.05),
    embeddings N(0, 1) and the other free parameters (ViT's cls token and position
    embeddings) N(0, 0.02) as in HF."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        zoo.reset_parameters_(model)

    def normal(t, std):
        t.copy_(torch.randn(t.shape, generator=gen) * std)

    done = set()
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            gain = 2.0 if name.rsplit(".", 1)[-1] in ("query", "key") else 1.0
            normal(m.weight, gain / math.sqrt(m.weight[0].numel()))
            if m.bias is not None:
                normal(m.bias, 0.02)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 0.4 + 0.8)
            if m.bias is not None:
                normal(m.bias, 0.05)
        elif isinstance(m, nn.Embedding):
            normal(m.weight, 1.0)
            if m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        else:
            continue
        done.update(id(p) for p in m.parameters(recurse=False))
    for p in model.parameters():
        if id(p) not in done:
            normal(p, 0.02)
    return model


def _hf(name: str, description: str, kind: str):
    def build(seed: int = 0, attn: str = "sdpa") -> nn.Module:
        if attn not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn={attn!r}; choose from {ATTN_IMPLEMENTATIONS}")
        import transformers
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if kind == "bert":
                model = transformers.BertModel(transformers.BertConfig(attn_implementation=attn))
            else:
                model = transformers.ViTModel(transformers.ViTConfig(attn_implementation=attn))
        got = getattr(model.config, "_attn_implementation", attn)
        if got != attn:
            raise RuntimeError(f"asked for attn_implementation={attn!r}, transformers chose {got!r}")
        reinit_transformer_(model, seed)
        return HFOutputs(model, "input_ids" if kind == "bert" else "pixel_values").eval()

    def inputs(batch: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed + 100)
        if kind == "bert":  # BertConfig(): vocab 30522, seq 128 (no padding: mask is all ones)
            return (torch.randint(1000, 30000, (batch, 128), generator=gen),)
        return (torch.randn(batch, 3, 224, 224, generator=gen),)

    return ModelSpec(name, "transformer", description, build, inputs)


MODELS = {
    "resnet50": _cnn("resnet50", "ResNet-50 (bench.zoo, torchvision look-alike), 224x224"),
    "mobilenet_v3_large": _cnn("mobilenet_v3_large",
                               "MobileNetV3-Large (hardswish, SE, depthwise), 224x224"),
    "efficientnet_b0": _cnn("efficientnet_b0", "EfficientNet-B0 (SiLU, SE, depthwise), 224x224"),
    "bert_base": _hf("bert_base", "transformers BertModel, BertConfig() (base), seq 128", "bert"),
    "vit_base": _hf("vit_base", "transformers ViTModel, ViTConfig() (base, 16x16 patches), 224x224",
                    "vit"),
    "resnet18": _cnn("resnet18", "ResNet-18 (bench.zoo), 224x224"),
    "mobilenet_v3_small": _cnn("mobilenet_v3_small", "MobileNetV3-Small, 224x224"),
    "tiny": ModelSpec("tiny", "cnn", "TinyNet (smoke test): conv-BN-ReLU, residual, SE, 32x32",
                      _build_tiny, _tiny_inputs),
}
DEFAULT_MODELS = ["resnet50", "mobilenet_v3_large", "efficientnet_b0", "bert_base", "vit_base"]


def check_output(out, what: str = "output") -> float:
    """Refuse ~0 / non-finite outputs (a badly initialised model times denormals or
    nothing). Returns the smallest std over the float outputs."""
    leaves = out if isinstance(out, (tuple, list)) else [out]
    stds = []
    for i, t in enumerate(leaves):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            continue
        if not torch.isfinite(t).all():
            raise ValueError(f"{what}[{i}] has non-finite values")
        std = t.float().std().item() if t.numel() > 1 else t.abs().item()
        if not std > 1e-3:
            raise ValueError(f"{what}[{i}] is ~0 (std {std:.3g}): fix the model's init")
        stds.append(std)
    return min(stds) if stds else float("nan")
