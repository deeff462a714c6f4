"""A small convolutional stem for ViTs on small images ("Early Convolutions Help Transformers See Better",
Xiao et al. 2021): 3x3 conv + BatchNorm + GELU layers in place of a large-stride patchify. As in a ResNet,
a layer wider than the one before it halves the resolution (stride 2); the others keep it. Module names
follow timm's ConvStem (`N.conv`, `N.bn`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def stem_strides(channels: tuple[int, ...]) -> list[int]:
    return [1] + [2 if c > prev else 1 for prev, c in zip(channels, channels[1:])]


class ConvBNAct(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)  # BN makes a bias redundant
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.bn(self.conv(x)))


class ConvStem(nn.Sequential):
    def __init__(self, channels: tuple[int, ...], in_chans: int = 3):
        cins = (in_chans, *channels[:-1])
        super().__init__(*(ConvBNAct(cin, cout, s) for cin, cout, s in zip(cins, channels, stem_strides(channels))))
        self.out_channels = channels[-1]
        self.reduction = 2 ** stem_strides(channels).count(2)
