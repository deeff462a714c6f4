"""Peer models with random weights, saved the peers' own ways, and the comparisons the checkpoint tests share."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import vitkit

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402
from torchvision.models import vision_transformer as tv  # noqa: E402

TOL = 1e-4
CLASSES = 10
# vitkit name: (width, heads, mlp_dim, patch, timm name); depth is reduced to 1 in the tests
SHAPES = {"ViT-Ti/16": (192, 3, 768, 16, "vit_tiny_patch16_224"),
          "ViT-B/16": (768, 12, 3072, 16, "vit_base_patch16_224"),
          "ViT-B/32": (768, 12, 3072, 32, "vit_base_patch32_224"),
          "ViT-L/16": (1024, 16, 4096, 16, "vit_large_patch16_224")}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (peers zero some at init), norms near 1, position embeddings and classifier
    large enough that resampling the position embeddings the wrong way shows clearly in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1 + 0.1 * r)
            elif any(s in name for s in ("pos", "cls_token", "class_token")):
                p.copy_(0.5 * r)
            elif any(s in name for s in ("head", "classifier")):  # logits of a few units, not hundredths
                p.copy_(0.2 * r)
            else:
                p.copy_(0.02 * r)
    return model.eval()


def images(size: int | tuple[int, int], n: int = 2, seed: int = 1) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    assert ref.abs().max() > 0.05, "reference output is ~0: the comparison would prove nothing"
    diff = (ours - ref).abs().max().item()
    assert diff <= TOL, f"max abs diff {diff:.2e} > {TOL}"


def vitkit_logits(name: str, weights, size, n: int = 2, **kw) -> torch.Tensor:
    model = vitkit.create_model(name, weights=weights, img_size=size, depth=kw.pop("depth", 1), **kw)
    with torch.no_grad():
        return model(images(size, n))


def google_npz(path, width, heads, mlp, patch, *, depth=1, grid=(14, 14), layout="vit", cls=True, rep=None,
               prefix="", hybrid=None, classes=CLASSES, seed=0):
    """The official key layout from random arrays. layout 'vit': vision_transformer/AugReg (encoderblock_{i},
    [class] position in posembed_input); 'big_vision': scanned blocks, top-level pos_embedding without it."""
    rng = np.random.default_rng(seed)

    def n(*shape, std=0.02):
        return (std * rng.standard_normal(shape)).astype(np.float32)

    def one(c):
        return (1 + 0.1 * rng.standard_normal(c)).astype(np.float32)

    w, cin = {}, 3
    if hybrid:
        w.update({"conv_root/kernel": n(7, 7, 3, 64, std=1), "gn_root/scale": one(64), "gn_root/bias": n(64)})
        cin = 64
        for s, units in enumerate(hybrid, 1):
            cout = 256 * 2 ** (s - 1)
            for u in range(1, units + 1):
                p = f"block{s}/unit{u}/"
                mid = cout // 4
                for r, (k, a, b) in enumerate([(1, cin, mid), (3, mid, mid), (1, mid, cout)], 1):
                    w.update({f"{p}conv{r}/kernel": n(k, k, a, b, std=1), f"{p}gn{r}/scale": one(b),
                              f"{p}gn{r}/bias": n(b)})
                if u == 1:
                    w.update({f"{p}conv_proj/kernel": n(1, 1, cin, cout, std=1), f"{p}gn_proj/scale": one(cout),
                              f"{p}gn_proj/bias": n(cout)})
                cin = cout
    w.update({"embedding/kernel": n(patch, patch, cin, width), "embedding/bias": n(width)})
    if cls:
        w["cls"] = n(1, 1, width, std=0.5)
    positions = grid[0] * grid[1]
    if layout == "vit":
        w["Transformer/posembed_input/pos_embedding"] = n(1, positions + cls, width, std=0.5)
        names = ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
    else:
        w["pos_embedding"] = n(1, positions, width, std=0.5)
        names = ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
    ln1, mha, ln2, mlp_block = names
    blocks = []
    for _ in range(depth):
        b = {f"{ln1}/scale": one(width), f"{ln1}/bias": n(width), f"{ln2}/scale": one(width), f"{ln2}/bias": n(width),
             f"{mha}/out/kernel": n(heads, width // heads, width), f"{mha}/out/bias": n(width),
             f"{mlp_block}/Dense_0/kernel": n(width, mlp), f"{mlp_block}/Dense_0/bias": n(mlp),
             f"{mlp_block}/Dense_1/kernel": n(mlp, width), f"{mlp_block}/Dense_1/bias": n(width)}
        for q in ("query", "key", "value"):
            b.update({f"{mha}/{q}/kernel": n(width, heads, width // heads),
                      f"{mha}/{q}/bias": n(heads, width // heads)})
        blocks.append(b)
    if layout == "vit":
        w.update({f"Transformer/encoderblock_{i}/{k}": v for i, b in enumerate(blocks) for k, v in b.items()})
    else:
        w.update({f"Transformer/encoderblock/{k}": np.stack([b[k] for b in blocks]) for k in blocks[0]})
    w.update({"Transformer/encoder_norm/scale": one(width), "Transformer/encoder_norm/bias": n(width)})
    if rep:
        w.update({"pre_logits/kernel": n(width, rep), "pre_logits/bias": n(rep)})
    w.update({"head/kernel": n(rep or width, classes, std=0.2), "head/bias": n(classes)})
    np.savez(path, **{prefix + k: v for k, v in w.items()})
    return w


def timm_from_npz(path, width, heads, mlp, patch, size, *, cls=True, big_vision=False, depth=1):
    """timm's own .npz loader is the reference."""
    model = TimmViT(img_size=size, patch_size=patch, embed_dim=width, depth=depth, num_heads=heads,
                    mlp_ratio=mlp / width, num_classes=CLASSES, class_token=cls, global_pool="token" if cls else "avg",
                    fc_norm=False, no_embed_class=big_vision and cls).eval()
    model.load_pretrained(str(path))
    return model


def save_timm(model, path, container=False):
    sd = model.state_dict()
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save({"model": sd} if container else sd, path)


def timm_reference(timm_name, path, size, n=2, **kw):
    """timm's own pretrained loading (checkpoint_filter_fn resamples the position embeddings)."""
    overlay = dict(file=str(path), num_classes=CLASSES)  # the file's head is kept, not dropped as a mismatch
    model = timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay=overlay, img_size=size,
                              num_classes=CLASSES, **kw).eval()
    with torch.no_grad():
        return model(images(size, n))


def hf_vit(name, depth=1, cls=None, **kw):
    width, heads, mlp, patch, _ = SHAPES[name]
    config = transformers.ViTConfig(**{**dict(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                                              intermediate_size=mlp, patch_size=patch, num_labels=CLASSES), **kw})
    return randomize((cls or transformers.ViTForImageClassification)(config))


def tv_vit(name, size=224, depth=1):
    width, heads, mlp, patch, _ = SHAPES[name]
    return tv.VisionTransformer(image_size=size, patch_size=patch, num_layers=depth, num_heads=heads,
                                hidden_dim=width, mlp_dim=mlp, num_classes=CLASSES)
