"""Training-time augmentation (torchvision transforms v2): per image crop / flip / RandAugment or
TrivialAugment / random erasing, and per batch Mixup or CutMix. Small in-memory images that need only shifts
and flips take a batched path (`BatchShiftFlip`) that draws the same kind of augmentation ~17x faster."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.transforms import v2

from .datasets import in_memory
from .images import _INTERPOLATION


def train_transform(aug: dict, img_size: tuple[int, int], preprocess: dict) -> v2.Compose:
    interp = _INTERPOLATION[preprocess.get("interpolation", "bicubic")]
    ops: list = [v2.ToImage()]
    if aug["crop"] == "random_resized":
        ops.append(v2.RandomResizedCrop(img_size, scale=tuple(aug["scale"]), interpolation=interp, antialias=True))
    else:  # the whole image at the model's size, optionally shifted by a padded random crop (ResNet CIFAR style)
        ops.append(v2.Resize(img_size, interpolation=interp, antialias=True))
        if aug["crop"] == "pad" and aug["padding"]:
            ops.append(v2.RandomCrop(img_size, padding=aug["padding"], fill=0))
    if aug["hflip"]:
        ops.append(v2.RandomHorizontalFlip(aug["hflip"]))
    bilinear = _INTERPOLATION["bilinear"]  # the ops' rotations and shears cannot be bicubic on tensors
    if aug["auto_augment"] == "randaugment":  # magnitude on timm's/DeiT's 0-10 scale ("rand-m9": 9/10 of the max),
        # not torchvision's default 31 bins (where 9 would be 9/30 of the max, 3x weaker than DeiT's)
        ops.append(v2.RandAugment(aug["randaugment_ops"], aug["randaugment_magnitude"], num_magnitude_bins=11,
                                  interpolation=bilinear))
    elif aug["auto_augment"] == "trivialaugment":
        ops.append(v2.TrivialAugmentWide(interpolation=bilinear))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(preprocess["mean"]), list(preprocess["std"]))]
    if aug["random_erasing"]:
        ops.append(v2.RandomErasing(aug["random_erasing"], value="random"))
    return v2.Compose(ops)


def batch_mixer(aug: dict, num_classes: int) -> v2.Transform | None:
    """Mixup and/or CutMix on a batch (one of them, chosen at random, when both are on); labels become soft."""
    mixers = [cls(alpha=a, num_classes=num_classes)
              for cls, a in ((v2.MixUp, aug["mixup"]), (v2.CutMix, aug["cutmix"])) if a > 0]
    return None if not mixers else mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-spread 64-bit hash of a uint64 array (its arithmetic wraps)."""
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class BatchShiftFlip(Dataset):
    """`train_transform`'s padded random crop and horizontal flip for decoded uint8 images already at the
    model's size, done on whole batches in the collate function: at 32 px torchvision's per-image pipeline
    costs about 8% of the CIFAR recipe's training step on a 2-core CPU, this 17x less (bench_cifar_step.py). Each
    image's draws are a hash of (seed, epoch, index), so, as with per-image seeding, they depend on neither
    the batch the image lands in, the loader workers, resumption nor the process rank."""

    def __init__(self, images: Dataset, padding: int, hflip: float, mean, std, seed: int):
        self.images, self.padding, self.hflip = images, padding, hflip
        self.key = _mix(np.array([seed], dtype=np.uint64))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255

    @classmethod
    def applies(cls, aug: dict, images: Dataset, img_size: tuple[int, int], preprocess: dict, seed: int):
        """The batched path when it gives what `train_transform` would, else None."""
        if (aug["crop"] == "random_resized" or aug["auto_augment"] or aug["random_erasing"]
                or not in_memory(images) or tuple(images[0][0].shape[-2:]) != tuple(img_size)):
            return None
        padding = aug["padding"] if aug["crop"] == "pad" else 0
        return cls(images, padding, aug["hflip"], preprocess["mean"], preprocess["std"], seed)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):  # the sampler's (epoch, index)
        return key, *self.images[key[1]]

    def draws(self, epochs: np.ndarray, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row shift, column shift, flip?) per image, each shift in [0, 2 * padding]."""
        h = _mix(_mix(self.key ^ epochs.astype(np.uint64)) ^ indices.astype(np.uint64))
        n = np.uint64(2 * self.padding + 1)
        flip = (h >> np.uint64(40)).astype(np.float64) / 2.0**24 < self.hflip
        dy, dx = ((h >> np.uint64(bits)) % n for bits in (0, 20))  # independent bits of the hash
        return torch.from_numpy(dy.astype(np.int64)), torch.from_numpy(dx.astype(np.int64)), torch.from_numpy(flip)

    def collate(self, items: list) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(normalised float images, labels, skipped: none, in-memory images are all readable)."""
        x = torch.stack([img.as_subclass(torch.Tensor) for _, img, _ in items])
        y = torch.tensor([label for _, _, label in items])
        keys = np.array([key for key, _, _ in items], dtype=np.int64)
        dy, dx, flip = self.draws(keys[:, 0], keys[:, 1])
        B, C, H, W = x.shape
        p = self.padding  # zero padding (black, as v2.RandomCrop's fill=0), then one gather for window and flip
        cols = torch.where(flip[:, None], torch.arange(W - 1, -1, -1), torch.arange(W)) + dx[:, None]  # (B, W)
        rows = torch.arange(H) + dy[:, None]  # (B, H)
        Hp, Wp = H + 2 * p, W + 2 * p
        index = (torch.arange(C).view(1, C, 1, 1) * Hp * Wp + rows.view(B, 1, H, 1) * Wp + cols.view(B, 1, 1, W))
        x = F.pad(x, (p, p, p, p)).view(B, -1).gather(1, index.view(B, -1)).view(B, C, H, W)
        return (x.float() - self.mean) / self.std, y, []
