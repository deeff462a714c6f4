"""A small convolutional stem for ViTs on small images ("Early Convolutions Help Transformers See Better",
Xiao et al. 2021): 3x3 conv + BatchNorm + GELU layers, the first at full resolution and each later one
halving it, in place of a large-stride patchify. Module names follow timm's ConvStem (`N.conv`, `N.bn`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
        super().__init__(*(ConvBNAct(cin, cout, 2 if i else 1) for i, (cin, cout) in enumerate(zip(cins, channels))))
        self.out_channels = channels[-1]
        self.reduction = 2 ** (len(channels) - 1)
