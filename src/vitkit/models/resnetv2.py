"""BiT ResNet-v2 stem of the paper's hybrid ViT (R50+ViT-B/16).

Post-activation bottlenecks with GroupNorm(32) and weight-standardised convolutions, with TensorFlow
"SAME" padding, as in the official hybrid checkpoints. Module names follow timm's ResNetV2 so timm
state dicts load without renaming.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _same_pad(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """TF 'SAME' padding: output size ceil(in/stride), extra pixel on the bottom/right."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value) if any(pads) else x


class StdConv2d(nn.Conv2d):
    """Conv2d whose kernel is standardised (zero mean, unit variance per output channel) on the fly."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, eps: float = 1e-8):
        super().__init__(cin, cout, kernel, stride=stride, bias=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (w - mean) / torch.sqrt(var + self.eps)
        return F.conv2d(_same_pad(x, self.kernel_size[0], self.stride[0]), w, None, self.stride)


def _gn(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-5)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        mid = cout // 4
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Module()
            self.downsample.conv, self.downsample.norm = StdConv2d(cin, cout, 1, stride), _gn(cout)
        self.conv1, self.norm1 = StdConv2d(cin, mid, 1), _gn(mid)
        self.conv2, self.norm2 = StdConv2d(mid, mid, 3, stride), _gn(mid)
        self.conv3, self.norm3 = StdConv2d(mid, cout, 1), _gn(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample.norm(self.downsample.conv(x))
        x = F.relu(self.norm1(self.conv1(x)))
        x = F.relu(self.norm2(self.conv2(x)))
        return F.relu(self.norm3(self.conv3(x)) + shortcut)


class ResNetV2Stem(nn.Module):
    """Root conv 7x7/2 + max-pool 3x3/2, then len(layers) stages; stage i>0 halves the resolution."""

    def __init__(self, layers: tuple[int, ...] = (3, 4, 9), in_chans: int = 3, width: int = 64):
        super().__init__()
        self.stem = nn.Module()
        self.stem.conv, self.stem.norm = StdConv2d(in_chans, width, 7, 2), _gn(width)
        self.stages = nn.Sequential()
        cin = width
        for i, depth in enumerate(layers):
            cout = width * 4 * 2**i
            stage = nn.Module()
            stage.blocks = nn.Sequential(*[Bottleneck(cin if j == 0 else cout, cout, 2 if (i and not j) else 1)
                                           for j in range(depth)])
            self.stages.add_module(str(i), stage)
            cin = cout
        self.out_channels = cin
        self.reduction = 4 * 2 ** (len(layers) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem.norm(self.stem.conv(x)))
        x = F.max_pool2d(_same_pad(x, 3, 2, value=float("-inf")), 3, 2)
        for stage in self.stages:
            x = stage.blocks(x)
        return x
