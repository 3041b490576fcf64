"""Reference conv nets with random weights: a test and bench asset, not part of the package.

Why this exists: torchvision (and timm) cannot be installed in this environment
(they pull incompatible torch builds), yet the demo, the tests and the benchmarks
need realistic CNN graphs -- conv+BN+activation chains, depthwise convs,
squeeze-excite, residual adds -- to exercise the fusion passes. So this module
re-implements torchvision's ResNet-18/50, MobileNetV3-Small/Large and
EfficientNet-B0 with the *same architecture and module names* (hence the same
parameter counts and state_dict keys as torchvision), depending on nothing but
torch. Nothing is downloaded: weights are random, made numerically sane and
deterministic by :func:`reinit_` (see its docstring for why the defaults are not
good enough).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

__all__ = ["MODELS", "build", "example_input", "reinit_", "resnet18", "resnet50",
           "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0"]


def _make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """torchvision's channel rounding (never rounds down by more than 10%)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ConvBNAct(nn.Sequential):
    """torchvision.ops.Conv2dNormActivation: conv(bias=False) -> norm -> act(inplace)."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
                 norm: Callable[..., nn.Module] = nn.BatchNorm2d,
                 act: Optional[Callable[..., nn.Module]] = nn.ReLU):
        layers: List[nn.Module] = [
            nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), norm(cout)]
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: x * scale_act(fc2(act(fc1(avgpool(x)))))."""

    def __init__(self, cin: int, csq: int, activation: Callable[..., nn.Module] = nn.ReLU,
                 scale_activation: Callable[..., nn.Module] = nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(cin, csq, 1), nn.Conv2d(csq, cin, 1)
        self.activation, self.scale_activation = activation(), scale_activation()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


# ----------------------------------------------------------------------------- ResNet
def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)


class _ResBlock(nn.Module):
    """torchvision's block forward: ``out = branch(x); out += downsample(x) or x; relu``."""

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self._branch(x)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class BasicBlock(_ResBlock):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv1, self.bn1 = _conv(inplanes, planes, 3, stride), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = _conv(planes, planes, 3), nn.BatchNorm2d(planes)
        self.downsample, self.stride = downsample, stride

    def _branch(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))


class Bottleneck(_ResBlock):
    """ResNet v1.5 bottleneck: the stride sits on the 3x3 conv."""
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv1, self.bn1 = _conv(inplanes, planes, 1), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = _conv(planes, planes, 3, stride), nn.BatchNorm2d(planes)
        self.conv3 = _conv(planes, planes * self.expansion, 1)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample, self.stride = downsample, stride

    def _branch(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


class ResNet(nn.Module):
    def __init__(self, block: type, layers: List[int], num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1, self.bn1 = _conv(3, 64, 7, 2), nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample, cout = None, planes * block.expansion
        if stride != 1 or self.inplanes != cout:
            downsample = nn.Sequential(_conv(self.inplanes, cout, 1, stride), nn.BatchNorm2d(cout))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = cout
        layers += [block(cout, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes)


def resnet50(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes)


# ------------------------------------------------------------------------ MobileNetV3
class InvertedResidual(nn.Module):
    def __init__(self, cin: int, k: int, cexp: int, cout: int, use_se: bool, use_hs: bool,
                 stride: int, norm: Callable[..., nn.Module]):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        act = nn.Hardswish if use_hs else nn.ReLU
        layers: List[nn.Module] = []
        if cexp != cin:
            layers.append(ConvBNAct(cin, cexp, 1, norm=norm, act=act))
        layers.append(ConvBNAct(cexp, cexp, k, stride, groups=cexp, norm=norm, act=act))
        if use_se:
            layers.append(SqueezeExcitation(cexp, _make_divisible(cexp // 4, 8),
                                            scale_activation=nn.Hardsigmoid))
        layers.append(ConvBNAct(cexp, cout, 1, norm=norm, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result += x
        return result


# (in, kernel, expanded, out, use_se, use_hardswish, stride) -- torchvision's tables
_MNV3_LARGE = [(16, 3, 16, 16, 0, 0, 1), (16, 3, 64, 24, 0, 0, 2), (24, 3, 72, 24, 0, 0, 1),
               (24, 5, 72, 40, 1, 0, 2), (40, 5, 120, 40, 1, 0, 1), (40, 5, 120, 40, 1, 0, 1),
               (40, 3, 240, 80, 0, 1, 2), (80, 3, 200, 80, 0, 1, 1), (80, 3, 184, 80, 0, 1, 1),
               (80, 3, 184, 80, 0, 1, 1), (80, 3, 480, 112, 1, 1, 1), (112, 3, 672, 112, 1, 1, 1),
               (112, 5, 672, 160, 1, 1, 2), (160, 5, 960, 160, 1, 1, 1), (160, 5, 960, 160, 1, 1, 1)]
_MNV3_SMALL = [(16, 3, 16, 16, 1, 0, 2), (16, 3, 72, 24, 0, 0, 2), (24, 3, 88, 24, 0, 0, 1),
               (24, 5, 96, 40, 1, 1, 2), (40, 5, 240, 40, 1, 1, 1), (40, 5, 240, 40, 1, 1, 1),
               (40, 5, 120, 48, 1, 1, 1), (48, 5, 144, 48, 1, 1, 1), (48, 5, 288, 96, 1, 1, 2),
               (96, 5, 576, 96, 1, 1, 1), (96, 5, 576, 96, 1, 1, 1)]


class MobileNetV3(nn.Module):
    def __init__(self, cfg: list, last_channel: int, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)
        layers: List[nn.Module] = [ConvBNAct(3, cfg[0][0], 3, 2, norm=norm, act=nn.Hardswish)]
        for cin, k, cexp, cout, se, hs, s in cfg:
            layers.append(InvertedResidual(cin, k, cexp, cout, bool(se), bool(hs), s, norm))
        lastconv_out = 6 * cfg[-1][3]
        layers.append(ConvBNAct(cfg[-1][3], lastconv_out, 1, norm=norm, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(lastconv_out, last_channel), nn.Hardswish(inplace=True),
            nn.Dropout(p=dropout, inplace=True), nn.Linear(last_channel, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def mobilenet_v3_large(num_classes: int = 1000) -> MobileNetV3:
    return MobileNetV3(_MNV3_LARGE, 1280, num_classes)


def mobilenet_v3_small(num_classes: int = 1000) -> MobileNetV3:
    return MobileNetV3(_MNV3_SMALL, 1024, num_classes)


# ---------------------------------------------------------------------- EfficientNet
class StochasticDepth(nn.Module):
    """torchvision.ops.StochasticDepth(mode="row"); the identity in eval mode."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty([x.shape[0]] + [1] * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep.div_(1.0 - self.p)


class MBConv(nn.Module):
    def __init__(self, expand_ratio: int, k: int, stride: int, cin: int, cout: int,
                 sd_prob: float, norm: Callable[..., nn.Module] = nn.BatchNorm2d):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        cexp = _make_divisible(cin * expand_ratio, 8)
        layers: List[nn.Module] = []
        if cexp != cin:
            layers.append(ConvBNAct(cin, cexp, 1, norm=norm, act=nn.SiLU))
        layers.append(ConvBNAct(cexp, cexp, k, stride, groups=cexp, norm=norm, act=nn.SiLU))
        layers.append(SqueezeExcitation(cexp, max(1, cin // 4),
                                        activation=partial(nn.SiLU, inplace=True)))
        layers.append(ConvBNAct(cexp, cout, 1, norm=norm, act=None))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(sd_prob)

    def forward(self, x: Tensor) -> Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += x
        return result


# (expand_ratio, kernel, stride, in, out, num_layers) -- B0 (width = depth = 1.0)
_EFFNET_B0 = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2),
              (6, 3, 2, 40, 80, 3), (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4),
              (6, 3, 1, 192, 320, 1)]


class EfficientNet(nn.Module):
    def __init__(self, cfg: list, dropout: float = 0.2, stochastic_depth_prob: float = 0.2,
                 num_classes: int = 1000):
        super().__init__()
        layers: List[nn.Module] = [ConvBNAct(3, cfg[0][3], 3, 2, act=nn.SiLU)]
        total, idx = sum(c[5] for c in cfg), 0
        for e, k, s, cin, cout, n in cfg:
            stage = []
            for j in range(n):
                stage.append(MBConv(e, k, s if j == 0 else 1, cin if j == 0 else cout, cout,
                                    stochastic_depth_prob * idx / total))
                idx += 1
            layers.append(nn.Sequential(*stage))
        lastconv_out = 4 * cfg[-1][4]
        layers.append(ConvBNAct(cfg[-1][4], lastconv_out, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout, inplace=True),
                                        nn.Linear(lastconv_out, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def efficientnet_b0(num_classes: int = 1000) -> EfficientNet:
    return EfficientNet(_EFFNET_B0, num_classes=num_classes)


# ----------------------------------------------------------------------- utilities
def reset_parameters_(model: nn.Module) -> None:
    """Every submodule's own ``reset_parameters`` (PyTorch's default init)."""
    for m in model.modules():
        if callable(getattr(m, "reset_parameters", None)):
            m.reset_parameters()


@torch.no_grad()
def reinit_(model: nn.Module, seed: int = 0, calib_input: Optional[Tensor] = None) -> nn.Module:
    """Deterministically re-initialise ``model`` in place so its numerics are realistic.

    A fresh net is a poor test/benchmark subject: BN stats are exactly (0, 1) and affine
    (1, 0), so BN folding is trivially exact; torchvision zero-inits residual gammas; and
    PyTorch's default conv init shrinks activations ~3x per layer, so deep nets emit ~0 or
    denormals (also pathologically slow on x86). Here, under ``seed`` (the global RNG state
    is left untouched): every ``reset_parameters()`` is called; conv/linear weights get
    N(0, 2/fan_in); every BatchNorm gets running_mean ~ N(0, 0.1), running_var ~ U(0.5, 1.5),
    weight ~ U(0.5, 1.5) (never zero) and bias ~ N(0, 0.1). Residual nets still blow up
    (ResNet-50 logits ~1e4), so if ``calib_input`` is given, one eval forward pass on it
    rescales each conv/linear (LSUV-style) so its output has unit std. Returns ``model``.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        reset_parameters_(model)

    def rand(t: Tensor, lo: float, hi: float) -> None:
        t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)

    def randn(t: Tensor, std: float) -> None:
        t.copy_(torch.randn(t.shape, generator=gen) * std)

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            randn(m.weight, math.sqrt(2.0 / m.weight[0].numel()))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.running_mean is not None and m.running_var is not None:
                randn(m.running_mean, 0.1)
                rand(m.running_var, 0.5, 1.5)
            if m.affine:
                rand(m.weight, 0.5, 1.5)
                randn(m.bias, 0.1)
    if calib_input is not None:
        _calibrate(model, calib_input)
    return model


def _calibrate(model: nn.Module, x: Tensor) -> None:
    """Single-pass LSUV: each conv/linear, when first run, divides its weight and bias
    by its output's std and hands the rescaled output on, so downstream sees it."""
    done: set = set()

    def hook(m: nn.Module, args: tuple, out: Tensor) -> Optional[Tensor]:
        if m in done:
            return None
        done.add(m)
        std = out.float().std()
        if not (torch.isfinite(std) and std > 0):
            return None
        m.weight.div_(std)
        if m.bias is not None:
            m.bias.div_(std)
        return out / std

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


MODELS: Dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18, "resnet50": resnet50,
    "mobilenet_v3_small": mobilenet_v3_small, "mobilenet_v3_large": mobilenet_v3_large,
    "efficientnet_b0": efficientnet_b0,
}


def build(name: str, seed: int = 0, **kw) -> nn.Module:
    """``MODELS[name](**kw)`` in eval mode, :func:`reinit_`-ed with ``seed`` and calibrated
    on a deterministic 2x3x224x224 batch; leaves the global RNG state untouched."""
    calib = example_input(name, 2, 224, seed=seed + 1)
    with torch.random.fork_rng(devices=[]):  # construction's default init uses the global RNG
        model = MODELS[name](**kw)
    return reinit_(model, seed, calib).eval()


def example_input(name: str, batch_size: int = 1, resolution: int = 224, seed: int = 0) -> Tensor:
    """Deterministic ImageNet-like input ``[batch_size, 3, resolution, resolution]``."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, resolution, resolution, generator=gen)
