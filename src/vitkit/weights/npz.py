"""Google's official ViT checkpoints (.npz), plain and hybrid, in both layouts, with the keys at the top or
under `opt/target/` or `params/`:

- vision_transformer / AugReg: `Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1,
  LayerNorm_2, MlpBlock_3}`, the [class] position inside `Transformer/posembed_input/pos_embedding`;
- big_vision: `MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0`, blocks possibly scanned into one
  `Transformer/encoderblock/` with a leading depth axis, and `pos_embedding` at the top without a [class]
  position (big_vision adds [class] after the position embeddings; vitkit gives it a zero position).

Flax stores Dense kernels as (in, out), attention kernels as (D, heads, head_dim), convolutions as HWIO.
The hybrid's BiT stem is `conv_root`, `gn_root`, `block{s}/unit{u}/{conv,gn}{1,2,3,_proj}`.
"""
from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..models.registry import GOOGLE
from . import Checkpoint, CheckpointError, infer_config

PREFIXES = ("", "opt/target/", "params/")
# position embeddings resampled as timm's .npz loader (the PyTorch reference for these files) does it
RESAMPLE = {"mode": "bilinear", "antialias": False}


def is_npz(path: Path) -> bool:
    """A .npz name, or a zip archive of .npy arrays under another name."""
    if path.suffix == ".npz":
        return True
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return bool(names) and all(n.endswith(".npy") for n in names)


def read(path: Path) -> Checkpoint:
    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
        if magic == b"\x93NUMPY":
            raise ValueError("a single .npy array, not an archive of named arrays")
        if not magic.startswith(b"PK"):  # else numpy takes it for a pickle, and its refusal misleads
            raise ValueError("not a zip archive")
        f = np.load(path, allow_pickle=False)
        with f:  # only the model's arrays: 'opt/target/' files also hold the optimizer's state
            prefix = next((p for p in PREFIXES if f"{p}embedding/kernel" in f.files), None)
            keys = [k for k in f.files if prefix is not None and k.startswith(prefix)]
            arrays = {k[len(prefix):]: _tensor(f[k]) for k in keys}
            names = f.files[:5]
    except Exception as e:  # zip, zlib, format and pickle refusals all mean the same to the user
        raise CheckpointError(f"{path}: not a readable .npz archive ({type(e).__name__}: {e})") from None
    if prefix is None:
        raise CheckpointError(f"{path}: no 'embedding/kernel' array, so not a Google ViT checkpoint "
                              f"(keys: {', '.join(names) or 'none'})")
    try:
        return convert(arrays)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (KeyError, ValueError, IndexError) as e:  # a key or a shape the layout promised is not there
        raise CheckpointError(f"{path}: incomplete Google ViT checkpoint ({type(e).__name__}: {e})") from None


def _tensor(a: np.ndarray) -> torch.Tensor:
    if a.dtype.kind == "V" and a.dtype.itemsize == 2:  # bfloat16 as JAX saves it: raw 2-byte records
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16).float()
    return torch.from_numpy(np.array(a, dtype=np.float32))


def convert(w: dict[str, torch.Tensor]) -> Checkpoint:
    """Arrays by their names under the prefix ('', 'opt/target/' or 'params/') -> vitkit's state dict."""
    if any(k.startswith("MAPHead_0/") for k in w):
        raise CheckpointError("attention-pooling (MAP) head checkpoints are not supported")
    sd = {"patch_embed.proj.weight": w["embedding/kernel"].permute(3, 2, 0, 1),
          "patch_embed.proj.bias": w["embedding/bias"],
          "norm.weight": w["Transformer/encoder_norm/scale"], "norm.bias": w["Transformer/encoder_norm/bias"]}
    if "cls" in w:
        sd["cls_token"] = w["cls"].reshape(1, 1, -1)
    sd["pos_embed"] = _pos_embed(w, class_token="cls" in w)
    for name in ("pre_logits", "head"):
        if f"{name}/kernel" in w:
            sd[f"{name}.weight"], sd[f"{name}.bias"] = w[f"{name}/kernel"].T, w[f"{name}/bias"]
    heads = _blocks(w, sd)
    if "conv_root/kernel" in w:
        _hybrid_stem(w, sd)
    return Checkpoint(sd, "npz", config={**infer_config(sd), "num_heads": heads}, preprocess=dict(GOOGLE),
                      pos_resample=dict(RESAMPLE))


def _pos_embed(w: dict, class_token: bool) -> torch.Tensor:
    if "Transformer/posembed_input/pos_embedding" in w:  # vision_transformer: [class] position included
        pos = w["Transformer/posembed_input/pos_embedding"]
        return pos.reshape(1, -1, pos.shape[-1])
    if "pos_embedding" not in w:
        raise CheckpointError("no learned position embeddings (fixed sin-cos variants are not supported)")
    pos = w["pos_embedding"]  # big_vision: no [class] position
    pos = pos.reshape(1, -1, pos.shape[-1])
    return torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1) if class_token else pos


def _blocks(w: dict, sd: dict) -> int | None:
    """Encoder blocks into sd (vitkit names); returns the number of attention heads."""
    scanned = "Transformer/encoderblock/LayerNorm_0/scale" in w
    if scanned:
        depth = w["Transformer/encoderblock/LayerNorm_0/scale"].shape[0]
    else:
        depth = len({m[1] for k in w if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))})
    if not depth:
        raise CheckpointError("no encoder blocks (Transformer/encoderblock_0/...)")
    first = "Transformer/encoderblock/" if scanned else "Transformer/encoderblock_0/"
    # sub-module names differ between the layouts (LayerNorm_2 vs LayerNorm_1, ...): read them off block 0
    names = sorted({k[len(first):].split("/")[0] for k in w if k.startswith(first)},
                   key=lambda n: int(n.rsplit("_", 1)[1]))
    ln1, ln2 = [n for n in names if n.startswith("LayerNorm_")]
    (mha,) = [n for n in names if n.startswith("MultiHeadDotProductAttention_")]
    (mlp,) = [n for n in names if n.startswith("MlpBlock_")]
    for i in range(depth):
        def get(name: str) -> torch.Tensor:
            return w[f"{first}{name}"][i] if scanned else w[f"Transformer/encoderblock_{i}/{name}"]

        b = f"blocks.{i}."
        qkv = [get(f"{mha}/{n}/kernel") for n in ("query", "key", "value")]  # (D, heads, head_dim) each
        sd.update({
            b + "norm1.weight": get(f"{ln1}/scale"), b + "norm1.bias": get(f"{ln1}/bias"),
            b + "attn.qkv.weight": torch.cat([k.flatten(1).T for k in qkv]),
            b + "attn.qkv.bias": torch.cat([get(f"{mha}/{n}/bias").flatten() for n in ("query", "key", "value")]),
            b + "attn.proj.weight": get(f"{mha}/out/kernel").flatten(0, -2).T,  # (heads, head_dim, D)
            b + "attn.proj.bias": get(f"{mha}/out/bias"),
            b + "norm2.weight": get(f"{ln2}/scale"), b + "norm2.bias": get(f"{ln2}/bias"),
            b + "mlp.fc1.weight": get(f"{mlp}/Dense_0/kernel").T, b + "mlp.fc1.bias": get(f"{mlp}/Dense_0/bias"),
            b + "mlp.fc2.weight": get(f"{mlp}/Dense_1/kernel").T, b + "mlp.fc2.bias": get(f"{mlp}/Dense_1/bias"),
        })
    return qkv[0].shape[1] if qkv[0].ndim == 3 else None


def _hybrid_stem(w: dict, sd: dict) -> None:
    """BiT ResNet-v2 stem of the hybrid (R50+ViT-B/16): root conv + GroupNorm, then stages of bottlenecks."""
    def conv(key):  # HWIO -> OIHW
        return w[f"{key}/kernel"].permute(3, 2, 0, 1)

    def gn(dst, key):
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = w[f"{key}/scale"].flatten(), w[f"{key}/bias"].flatten()

    bb = "patch_embed.backbone."
    sd[bb + "stem.conv.weight"] = conv("conv_root")
    gn(bb + "stem.norm", "gn_root")
    units = sorted({(int(m[1]), int(m[2])) for k in w if (m := re.match(r"block(\d+)/unit(\d+)/", k))})
    for s, u in units:
        src, dst = f"block{s}/unit{u}/", f"{bb}stages.{s - 1}.blocks.{u - 1}."
        for r in (1, 2, 3):
            sd[f"{dst}conv{r}.weight"] = conv(f"{src}conv{r}")
            gn(f"{dst}norm{r}", f"{src}gn{r}")
        if f"{src}conv_proj/kernel" in w:
            sd[f"{dst}downsample.conv.weight"] = conv(f"{src}conv_proj")
            gn(f"{dst}downsample.norm", f"{src}gn_proj")
