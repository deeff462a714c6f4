"""A small convolutional stem for ViTs on small images ("Early Convolutions Help Transformers See Better",
Xiao et al. 2021): 3x3 conv + BatchNorm + GELU layers in place of a large-stride patchify. As in a ResNet,
a layer wider than the one before it halves the resolution; the others keep it. It halves it with stride 2
or, with `pool=True`, with a 2x2 max-pool after a full-resolution conv (4x the conv's cost, but more
accurate per epoch, as in the fast CIFAR-10 ResNets of Page 2018 and Jordan's airbench). Module names
follow timm's ConvStem (`N.conv`, `N.bn`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def stem_strides(channels: tuple[int, ...]) -> list[int]:
    return [1] + [2 if c > prev else 1 for prev, c in zip(channels, channels[1:])]


class ConvBNAct(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, pool: bool = False):
        super().__init__()
        self.pool = pool and stride == 2  # downsample after the conv instead of inside it
        self.conv = nn.Conv2d(cin, cout, 3, stride=1 if self.pool else stride, padding=1, bias=False)  # BN: no bias
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return F.gelu(self.bn(F.max_pool2d(x, 2) if self.pool else x))


class ConvStem(nn.Sequential):
    def __init__(self, channels: tuple[int, ...], in_chans: int = 3, pool: bool = False):
        cins, strides = (in_chans, *channels[:-1]), stem_strides(channels)
        super().__init__(*(ConvBNAct(cin, cout, s, pool) for cin, cout, s in zip(cins, channels, strides)))
        self.out_channels = channels[-1]
        self.reduction = 2 ** strides.count(2)

    @torch.no_grad()
    def whiten_(self, images: torch.Tensor) -> None:
        """Initialise the first conv from the data: its filters become the principal components of the images'
        3x3 patches, largest first, each with both signs (the rectifier keeps either half), as the "patch
        whitening" first layer of the fast CIFAR-10 trainers (tysam's hlb-CIFAR10, Jordan's airbench). The
        BatchNorm after the conv equalises their variances, so they keep the default initialisation's norm.
        `images`: a batch normalised as the model's inputs."""
        conv = self[0].conv
        patches = F.unfold(images.float(), conv.kernel_size).transpose(1, 2).flatten(0, 1)
        _, vectors = torch.linalg.eigh(patches.T @ patches / len(patches))  # ascending eigenvalues
        components = vectors.flip(1).T[: (conv.out_channels + 1) // 2]
        filters = torch.cat([components, -components])[: conv.out_channels]
        norm = conv.weight.flatten(1).norm(dim=1).mean()
        conv.weight[: len(filters)] = (filters * norm).view(-1, *conv.weight.shape[1:]).to(conv.weight.dtype)
