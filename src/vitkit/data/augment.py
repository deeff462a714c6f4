"""Training-time augmentation (torchvision transforms v2): per image crop / flip / RandAugment or
TrivialAugment / random erasing, and per batch Mixup or CutMix."""
from __future__ import annotations

import torch
from torchvision.transforms import v2

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
    if aug["auto_augment"] == "randaugment":
        ops.append(v2.RandAugment(aug["randaugment_ops"], aug["randaugment_magnitude"], interpolation=bilinear))
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
