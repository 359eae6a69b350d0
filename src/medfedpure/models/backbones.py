"""Feature extractors for the experts: torchvision ResNet-18 / MobileNetV2, a narrower ResNet-18
(timm's ResNet with BasicBlocks, for the CPU presets), ResNet-9 (the fast CIFAR-10 network) and a
small CNN."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from torchvision import models

log = logging.getLogger(__name__)


class SmallCNN(nn.Module):
    """Three conv blocks; for tests and the demo, where ResNet-18 would be slow."""

    out_features = 64

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(3, 16), block(16, 32), block(32, 64),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class ResNet9(nn.Module):
    """David Page's ResNet-9 (the DAWNBench CIFAR-10 network, 94% in 24 epochs on a GPU): a conv stem,
    then three stages of conv-norm-ReLU-max-pool at 2w, 4w and 8w channels, the first and last with a
    residual pair of convs, a global max-pool. `width` w is the stem's channels (64: Page's). Built for
    32-px scans; any size works (the pool is global)."""

    def __init__(self, width: int = 64, norm_layer=nn.BatchNorm2d) -> None:
        super().__init__()

        def conv(cin: int, cout: int, pool: bool = False) -> nn.Sequential:
            layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), norm_layer(cout), nn.ReLU(inplace=True)]
            return nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else []))

        w = width
        self.stem = conv(3, w)
        self.layer1, self.res1 = conv(w, 2 * w, pool=True), nn.Sequential(conv(2 * w, 2 * w), conv(2 * w, 2 * w))
        self.layer2 = conv(2 * w, 4 * w, pool=True)
        self.layer3, self.res3 = conv(4 * w, 8 * w, pool=True), nn.Sequential(conv(8 * w, 8 * w), conv(8 * w, 8 * w))
        self.pool = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.out_features = 8 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.stem(x))
        x = x + self.res1(x)
        x = self.layer3(self.layer2(x))
        return self.pool(x + self.res3(x))


def build_backbone(name: str, pretrained_weights: str | None = None,
                   small_input_stem: bool = False, norm: str = "batch", width: int = 64) -> tuple[nn.Module, int]:
    """A backbone that maps normalised images to a feature vector, and that vector's size.

    `small_input_stem` is the usual adaptation to 32-px images: the ImageNet stem divides a
    32-px scan down to 1x1 features, which learns slowly from scratch.
    `norm="group"` swaps BatchNorm for GroupNorm: averaged BatchNorm statistics lag far behind
    averaged weights when clients take few steps on label-skewed data, the known failure that
    GroupNorm avoids (Hsieh et al., 2020).
    `width` (resnet18, resnet9): the first stage's channels, doubled at each of the four stages (resnet9:
    the stem's; see ResNet9). 64 is
    torchvision's ResNet-18 (the paper's); a narrower one is timm's ResNet with the same 64-channel
    stem, blocks and layout, narrower stages (half the width: about a third of the training step's
    time on 2 CPU cores), trained from scratch.
    """
    if name == "small_cnn":
        if pretrained_weights:
            raise ValueError("model.pretrained_weights is not available for the small_cnn backbone")
        if small_input_stem or norm != "batch":
            raise ValueError("model.small_input_stem and model.norm are for resnet18 / mobilenet_v2, not small_cnn")
        return SmallCNN(), SmallCNN.out_features
    if name == "resnet9":
        if pretrained_weights or small_input_stem:
            raise ValueError("resnet9 is trained from scratch at its own (32-px) stem: no model.pretrained_weights "
                             "or model.small_input_stem")
        net = ResNet9(width, _group_norm if norm == "group" else nn.BatchNorm2d)
        return net, net.out_features
    if norm == "group" and pretrained_weights:
        raise ValueError("model.norm=group cannot take pretrained BatchNorm weights (model.pretrained_weights)")
    extra = {"norm_layer": _group_norm} if norm == "group" else {}
    if width != 64:
        if name != "resnet18" or pretrained_weights:
            raise ValueError("model.width other than 64 is for a resnet18 trained from scratch")
        net = _narrow_resnet18(width, extra)
        if small_input_stem:
            _shrink_stem(name, net)
        return net, net.num_features
    if name == "resnet18":
        net = models.resnet18(weights=_torchvision_weights(name, pretrained_weights), **extra)
        dim = net.fc.in_features
        net.fc = nn.Identity()
    elif name == "mobilenet_v2":
        net = models.mobilenet_v2(weights=_torchvision_weights(name, pretrained_weights), **extra)
        dim = net.classifier[-1].in_features
        net.classifier = nn.Identity()
    else:
        raise ValueError(f"unknown backbone '{name}' (resnet18, resnet9, mobilenet_v2, small_cnn)")
    if pretrained_weights and pretrained_weights != "imagenet":
        _load_local_weights(net, Path(pretrained_weights))
    if small_input_stem:
        _shrink_stem(name, net)
    return net, dim


def _narrow_resnet18(width: int, extra: dict) -> nn.Module:
    from timm.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=0, channels=(width, 2 * width, 4 * width, 8 * width),
                  **extra)


def _group_norm(channels: int, **factory) -> nn.GroupNorm:
    return nn.GroupNorm(8 if channels % 8 == 0 else 1, channels, **factory)


def _shrink_stem(name: str, net: nn.Module) -> None:
    """Stride-1 first conv (and, for ResNet-18, a 3x3 conv1 without max-pool), as CIFAR models do."""
    if name == "mobilenet_v2":
        net.features[0][0].stride = (1, 1)
    else:  # resnet18: the CIFAR ResNet stem; conv1's pretrained 7x7 kernel cannot carry over
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()


def _torchvision_weights(name: str, spec: str | None):
    if spec != "imagenet":
        return None
    # torchvision downloads these where a network exists; a clear error otherwise.
    return {"resnet18": models.ResNet18_Weights.IMAGENET1K_V1,
            "mobilenet_v2": models.MobileNet_V2_Weights.IMAGENET1K_V1}[name]


def _load_local_weights(net: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file '{path}' does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not m.startswith(("fc.", "classifier."))]:
        raise ValueError(f"weights file '{path}' does not match the backbone "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
