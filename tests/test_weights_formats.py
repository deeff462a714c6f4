"""Checkpoint handling beyond parity: `vitkit convert` for every format, head replacement, each codebase's own
position-embedding resampling, and files that are not checkpoints, are cut short, do not fit, or hold pickles."""
from __future__ import annotations

import json
import logging
import os
import pathlib
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from vitkit.cli import main
from vitkit.weights import CheckpointError, load_into, read_checkpoint
from weight_peers import (CLASSES, SHAPES, assert_close, google_npz, hf_vit, images, randomize, save_timm,
                          timm_from_npz, tv, tv_vit, vitkit_logits)

timm = pytest.importorskip("timm")
TI = SHAPES["ViT-Ti/16"][:4]  # width, heads, mlp_dim, patch
GOOGLE_MEAN, IMAGENET_MEAN = (0.5, 0.5, 0.5), (0.485, 0.456, 0.406)


def logits(model, size=224):
    with torch.no_grad():
        return model.eval()(images(size))


# Full-depth ViT-Ti/16 checkpoints of every format: (source path, model name, peer's logits, expected mean)
def npz_case(tmp_path):
    path = tmp_path / "ViT-Ti_16.npz"
    google_npz(path, *TI, depth=12)
    return path, "ViT-Ti/16", logits(timm_from_npz(path, *TI, 224, depth=12)), GOOGLE_MEAN


def timm_case(tmp_path):
    peer, path = randomize(timm.create_model("vit_tiny_patch16_224", num_classes=CLASSES)), tmp_path / "ti.safetensors"
    save_timm(peer, path)
    return path, "vit_tiny_patch16_224", logits(peer), GOOGLE_MEAN


def deit_case(tmp_path):
    peer, path = randomize(timm.create_model("deit_tiny_patch16_224", num_classes=CLASSES)), tmp_path / "deit.pth"
    save_timm(peer, path, container=True)
    return path, "deit_tiny_patch16_224", logits(peer), IMAGENET_MEAN


def transformers_case(tmp_path):
    peer = hf_vit("ViT-Ti/16", depth=12)
    peer.save_pretrained(tmp_path / "hf")
    with torch.no_grad():
        return tmp_path / "hf", "ViT-Ti/16", peer(pixel_values=images(224)).logits, GOOGLE_MEAN


def torchvision_case(tmp_path):
    peer, path = randomize(tv_vit("ViT-Ti/16", depth=12)), tmp_path / "tv.pth"
    torch.save(peer.state_dict(), path)
    return path, "ViT-Ti/16", logits(peer), IMAGENET_MEAN


CASES = {"npz": npz_case, "timm": timm_case, "deit": deit_case, "transformers": transformers_case,
         "torchvision": torchvision_case}


@pytest.mark.parametrize("fmt", CASES)
def test_convert_cli_then_load_model(tmp_path, fmt, capsys):
    src, name, ref, mean = CASES[fmt](tmp_path)
    dst = tmp_path / "converted.safetensors"
    assert main(["convert", str(src), str(dst), "--model", name]) == 0
    assert f"wrote {dst}" in capsys.readouterr().out
    model = vitkit.load_model(dst)
    assert tuple(model.preprocess["mean"]) == mean and len(model.blocks) == 12
    assert_close(logits(model), ref)


def test_convert_takes_a_shape_no_name_has(tmp_path, capsys):
    """A 3-layer transformers ViT: no name has its depth, and the command line had no way to give it."""
    peer = hf_vit("ViT-Ti/16", depth=3)
    peer.save_pretrained(tmp_path / "hf")
    with torch.no_grad():
        ref = peer(pixel_values=images(224)).logits
    convert = ["convert", str(tmp_path / "hf"), str(tmp_path / "out.safetensors"), "--model", "ViT-Ti/16"]
    assert main(convert) == 2
    assert "it holds a model with depth=3: pick a name of that shape, or give them (--set depth=3 on the command line; " \
        "create_model(..., depth=3))" in capsys.readouterr().err
    assert main([*convert, "--set", "depth=3"]) == 0
    model = vitkit.load_model(tmp_path / "out.safetensors")
    assert len(model.blocks) == 3
    assert_close(logits(model), ref)
    for bad, expected in [("depth", "expected FIELD=VALUE"), ("depht=3", "not a model field (one of"),
                          ("img_size=32", "use --img-size")]:
        assert main([*convert, "--force", "--set", bad]) == 2
        assert f"--set '{bad}': {expected}" in capsys.readouterr().err
    assert main([*convert, "--force", "--set", "depth=abc"]) == 2  # the flag that gave the value takes the blame
    assert "error: --set depth: depth must be an int, not str 'abc'" in capsys.readouterr().err
    # predict takes the same --set and gives what the converted checkpoint gives
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(photo)
    outputs = []
    for weights in (["--weights", str(tmp_path / "hf"), "--model", "ViT-Ti/16", "--set", "depth=3"],
                    ["--weights", str(tmp_path / "out.safetensors")]):
        assert main(["predict", str(photo), *weights, "--json", "--device", "cpu"]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    (direct, converted), unpack = outputs, lambda out: [(t["label"], t["prob"]) for t in out["top_k"]]
    assert [label for label, _ in unpack(direct)] == [label for label, _ in unpack(converted)]
    assert [p for _, p in unpack(direct)] == pytest.approx([p for _, p in unpack(converted)], abs=1e-6)


def test_convert_cli_bad_input_is_one_line(tmp_path, capsys):
    src = tmp_path / "notes.pth"
    src.write_text("not weights\n")
    assert main(["convert", str(src), str(tmp_path / "out.safetensors"), "--model", "ViT-Ti/16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitkit convert: error: ") and str(src) in err and "\n" not in err
    assert not (tmp_path / "out.safetensors").exists()


def test_convert_output_rules(tmp_path, capsys):
    """No silent overwrite, no directory as output, no ignored zero sizes; the file readable like any other."""
    src, dst = tmp_path / "ti.pth", tmp_path / "out.safetensors"
    torch.save(timm.create_model("vit_tiny_patch16_224").state_dict(), src)
    convert = ["convert", str(src), str(dst), "--model", "vit_tiny_patch16_224"]
    for extra, code, said in (([], 0, f"wrote {dst}"), ([], 2, "already exists (use --force to overwrite)"),
                              (["--force", "--num-classes", "7"], 0, "7 classes"),
                              (["--force", "--img-size", "0"], 2, "img_size must be positive, not (0, 0)")):
        capsys.readouterr()
        assert main([*convert, *extra]) == code
        out = capsys.readouterr()
        assert said in (out.out if code == 0 else out.err)
    assert vitkit.load_model(dst).cfg.num_classes == 7 and dst.stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert main(["convert", str(src), str(tmp_path), "--model", "vit_tiny_patch16_224"]) == 2
    assert "must be a .safetensors file, not a directory" in capsys.readouterr().err
    with pytest.raises(ValueError, match="a vitkit checkpoint is a .safetensors file"):
        vitkit.save_model(vitkit.load_model(dst), tmp_path / "x.pth")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("name", ["vit_tiny", "ViT-Ti/0", "ViT-Ti/16@0", "ViT-Ti/16@100"])
def test_unbuildable_model_name_is_one_line(tmp_path, capsys, name):
    src = tmp_path / "ti.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", depth=1).state_dict(), src)
    image = tmp_path / "a.png"
    Image.new("RGB", (40, 30)).save(image)
    assert main(["predict", str(image), "--weights", str(src), "--model", name]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"vitkit predict: error: --model {name}: ") and "\n" not in err, err


def test_checkpoint_runs_at_its_own_resolution(tmp_path, caplog):
    """A 384 px torchvision file (like the SWAG weights) or a transformers config at 160 px: that size, unless
    img_size says otherwise, under a name whose default is 224."""
    tv_path = tmp_path / "tv384.pth"
    torch.save(tv.VisionTransformer(384, 16, 1, 3, 192, 768).state_dict(), tv_path)
    hf_vit("ViT-Ti/16", image_size=160).save_pretrained(tmp_path / "hf160")
    for weights, native in ((tv_path, 384), (tmp_path / "hf160", 160)):
        caplog.clear()
        assert vitkit.create_model("ViT-Ti/16", weights=weights, depth=1).cfg.img_size == (native, native)
        assert "resampled" not in caplog.text
        assert vitkit.create_model("ViT-Ti/16", weights=weights, depth=1, img_size=224).cfg.img_size == (224, 224)
        assert f"resampled from {native // 16}x{native // 16} to 14x14" in caplog.text
    wide = tmp_path / "wide.pth"  # a 14x20 grid: its shape is not in the file, so the user gives it
    torch.save(timm.create_model("vit_tiny_patch16_224", img_size=(224, 320), depth=1).state_dict(), wide)
    assert "wide.pth: pos_embed: cannot tell the grid of 280 positions; give the checkpoint's own img_size" in \
        _error(wide, depth=1)
    assert vitkit.create_model("ViT-Ti/16", weights=wide, depth=1, img_size=(224, 320)).cfg.grid == (14, 20)
    from vitkit.cli import image_size
    assert image_size("224x320") == (224, 320) and image_size("384") == 384


def test_head_replaced_when_num_classes_differs(tmp_path, caplog):
    peer, path = randomize(timm.create_model("vit_tiny_patch16_224", depth=1, num_classes=CLASSES)), tmp_path / "t.pth"
    save_timm(peer, path)
    with caplog.at_level(logging.WARNING, logger="vitkit"):
        model = vitkit.create_model("ViT-Ti/16", weights=path, num_classes=3, depth=1)
    assert f"head replaced: checkpoint has {CLASSES} classes, model 3" in caplog.text
    assert model.head.out_features == 3 and not model.head.weight.any() and not model.head.bias.any()
    x = images(224)
    with torch.no_grad():  # everything but the head is the checkpoint's
        assert_close(model.forward_head(model.forward_features(x), pre_logits=True),
                     peer.forward_head(peer.forward_features(x), pre_logits=True))
        assert not model(x).any()


def _changed_size_case(tmp_path, fmt):
    """(checkpoint path, size, the peer's logits at that size) where the peer resamples its own way."""
    if fmt == "torchvision":
        peer, path = randomize(tv_vit("ViT-Ti/16")), tmp_path / "tv.pth"
        torch.save(peer.state_dict(), path)
        resized = tv_vit("ViT-Ti/16", 288)
        resized.load_state_dict(tv.interpolate_embeddings(288, 16, dict(peer.state_dict())))
        return path, 288, logits(resized, 288)
    if fmt == "npz":
        path = tmp_path / "vit.npz"
        google_npz(path, *TI)
        return path, 288, logits(timm_from_npz(path, *TI, 288), 288)
    peer = hf_vit("ViT-Ti/16")
    peer.save_pretrained(tmp_path)
    with torch.no_grad():
        return tmp_path, 160, peer(pixel_values=images(160), interpolate_pos_encoding=True).logits


@pytest.mark.parametrize("fmt", ["torchvision", "npz", "transformers"])
def test_resampling_follows_the_source_codebase(tmp_path, fmt):
    """torchvision: bicubic with align_corners; timm's .npz loader: bilinear; transformers: bicubic without
    antialiasing. vitkit's default (timm's bicubic + antialias) would give other logits."""
    path, size, ref = _changed_size_case(tmp_path, fmt)
    ckpt = read_checkpoint(path)
    for own_way in (True, False):
        if not own_way:
            ckpt.pos_resample = {}
        model = vitkit.create_model("ViT-Ti/16", depth=1, img_size=size, num_classes=CLASSES,
                                    norm_eps=ckpt.config.get("norm_eps", 1e-6))
        load_into(model, ckpt)
        diff = (logits(model, size) - ref).abs().max().item()
        assert diff <= 1e-4 if own_way else diff > 1e-3


@pytest.mark.parametrize("fmt", ["npz", "transformers"])
def test_num_heads_from_checkpoint_must_match(tmp_path, fmt):
    """Heads do not show in the weight shapes, so a wrong count would silently split q/k/v wrongly."""
    width, _, mlp, patch = TI
    if fmt == "npz":
        path = tmp_path / "vit.npz"
        google_npz(path, width, 6, mlp, patch)
        ref = logits(timm_from_npz(path, width, 6, mlp, patch, 224))
    else:
        peer, path = hf_vit("ViT-Ti/16", num_attention_heads=6), tmp_path
        peer.save_pretrained(path)
        with torch.no_grad():
            ref = peer(pixel_values=images(224)).logits
    with pytest.raises(CheckpointError, match="has 6 attention heads, the model 3.*num_heads=6"):
        vitkit.create_model("ViT-Ti/16", weights=path, depth=1)
    assert_close(vitkit_logits("ViT-Ti/16", path, 224, num_heads=6), ref)


def _error(weights, name="ViT-Ti/16", **kw) -> str:
    with pytest.raises(CheckpointError) as e:
        vitkit.create_model(name, weights=weights, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("content, suffix, reason", [
    (b"hello, these are not weights\n", ".pth", "not a PyTorch checkpoint"),
    (b"\x89PNG\r\n\x1a\n" + bytes(200), ".safetensors", "not a readable safetensors file"),
    (bytes(range(256)) * 8, ".npz", "not a readable .npz archive (ValueError: not a zip archive)"),
    (b"\x93NUMPY" + bytes(100), ".npz", "a single .npy array, not an archive of named arrays"),
    (b"", ".bin", "empty file"),
])
def test_not_a_checkpoint(tmp_path, content, suffix, reason):
    path = tmp_path / f"file{suffix}"
    path.write_bytes(content)
    msg = _error(path)
    assert reason in msg and str(path) in msg


def test_foreign_weights_and_folders(tmp_path):
    np.savez(tmp_path / "other.npz", weights=np.zeros(3, np.float32))
    assert "not a Google ViT checkpoint" in _error(tmp_path / "other.npz")
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 2048)}, tmp_path / "r50.pth")
    assert "not a ViT checkpoint of a known format (keys: conv1.weight, fc.weight)" in _error(tmp_path / "r50.pth")
    (tmp_path / "folder").mkdir()
    assert "without config.json" in _error(tmp_path / "folder")
    assert "no such file" in _error(tmp_path / "missing.pth")


@pytest.mark.parametrize("fmt", [".pth", ".safetensors", ".npz", "transformers"])
def test_truncated_file(tmp_path, fmt):
    if fmt == ".npz":
        path = tmp_path / "vit.npz"
        google_npz(path, *TI)
    elif fmt == "transformers":
        hf_vit("ViT-Ti/16").save_pretrained(tmp_path / "hf")
        path = tmp_path / "hf" / "model.safetensors"
    else:
        path = tmp_path / f"vit{fmt}"
        save_timm(timm.create_model("vit_tiny_patch16_224", depth=1, num_classes=CLASSES), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 5])
    assert str(path) in _error(path.parent if fmt == "transformers" else path, depth=1)


def test_checkpoint_that_does_not_fit(tmp_path):
    path = tmp_path / "ti.pth"
    save_timm(timm.create_model("vit_tiny_patch16_224", depth=1, num_classes=CLASSES), path)
    msg = _error(path, "ViT-S/16", depth=1)
    assert "shape mismatch: " in msg and "cls_token: checkpoint (1, 1, 192) vs model (1, 1, 384)" in msg
    assert "(+" in msg and "more)" in msg  # every block parameter differs: the list is cut, and says so
    msg = _error(path, depth=2)
    assert "missing in checkpoint: blocks.1.norm1.weight" in msg and "it holds a model with depth=1:" in msg
    tv_path = tmp_path / "tv_b16.pth"
    torch.save(tv_vit("ViT-Ti/16").state_dict(), tv_path)
    assert "patch_embed.proj.weight: checkpoint (192, 3, 16, 16) vs model (192, 3, 32, 32)" in _error(
        tv_path, "ViT-Ti/32", depth=1)


class _Payload:
    """Pickled as a call to Path.touch: anything that unpickles it runs that call."""

    def __init__(self, marker: pathlib.Path, call=pathlib.Path.touch):
        self.marker, self.call = marker, call

    def __reduce__(self):
        return (self.call, (f"touch {self.marker}",)) if self.call is os.system else (self.call, (self.marker,))


def test_pickle_with_objects_is_refused(tmp_path):
    marker, path = tmp_path / "code_ran", tmp_path / "deit_train.pth"
    sd = timm.create_model("vit_tiny_patch16_224", depth=1, num_classes=CLASSES).state_dict()
    torch.save({"model": sd, "payload": _Payload(marker)}, path)
    assert "refused to load" in _error(path, depth=1)
    assert not marker.exists()
    torch.save({"model": sd, "payload": _Payload(marker, os.system)}, path)  # a module torch blocks outright
    error = _error(path, depth=1)
    assert "refused to load: it holds a Python object (posix.system)" in error and "weights_only=False" not in error
    assert not marker.exists()
    with open(path, "wb") as f:  # a plain pickle: torch warned about its protocol on stderr before the error
        pickle.dump({"model": sd, "payload": _Payload(marker, os.system)}, f, protocol=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "a pickle of protocol 4, not written by torch.save" in _error(path, depth=1)
    assert not marker.exists()


@pytest.mark.parametrize("size, patch, interpolation, crop_pct", [
    (224, 16, "bilinear", 224 / 256),  # IMAGENET1K_V1 weights: resize 256, crop 224
    (384, 16, "bicubic", 1.0),  # SWAG end-to-end weights: resized straight to the input size
    (224, 14, "bicubic", 1.0),  # vit_h_14 has SWAG weights only
])
def test_torchvision_preprocessing_follows_the_weights(tmp_path, size, patch, interpolation, crop_pct):
    path = tmp_path / "tv.pth"
    torch.save(tv.VisionTransformer(size, patch, 1, 3, 192, 768).state_dict(), path)
    pre = read_checkpoint(path).preprocess
    assert pre == {"mean": IMAGENET_MEAN, "std": (0.229, 0.224, 0.225), "interpolation": interpolation,
                   "crop_pct": crop_pct}


def test_distilled_checkpoint_runs_at_its_own_resolution(tmp_path, caplog):
    path = tmp_path / "deit384.pth"
    peer = timm.create_model("deit_tiny_distilled_patch16_224", img_size=384, depth=1, num_classes=CLASSES)
    save_timm(peer, path, container=True)
    with caplog.at_level(logging.WARNING, logger="vitkit"):
        model = vitkit.create_model("deit_tiny_distilled_patch16_224", weights=path, depth=1)
    assert model.cfg.img_size == (384, 384) and "resampled" not in caplog.text


def test_transformers_center_crop_and_other_activations(tmp_path):
    peer = hf_vit("ViT-Ti/16")
    peer.save_pretrained(tmp_path / "crop")
    (tmp_path / "crop" / "preprocessor_config.json").write_text(json.dumps({
        "do_center_crop": True, "size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224},
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3}))
    pre = read_checkpoint(tmp_path / "crop").preprocess
    assert pre["crop_pct"] == 224 / 256 and pre["crop_mode"] == "center" and pre["interpolation"] == "bicubic"
    hf_vit("ViT-Ti/16", hidden_act="gelu_new").save_pretrained(tmp_path / "gelu_new")
    with pytest.raises(vitkit.weights.CheckpointError, match="hidden_act 'gelu_new'"):
        vitkit.create_model("ViT-Ti/16", weights=tmp_path / "gelu_new", depth=1)


def test_vitkit_checkpoint_round_trip_keeps_class_names_and_preprocess(tmp_path):
    model = vitkit.create_model("ViT-Ti/16", img_size=64, depth=1, num_classes=3)
    model.class_names = ["cat", "dog", "eel"]
    model.preprocess.update(crop_pct=0.8, interpolation="bilinear")
    loaded = vitkit.load_model(vitkit.save_model(model, tmp_path / "m.safetensors"))
    assert loaded.class_names == ["cat", "dog", "eel"] and loaded.preprocess == model.preprocess  # tuples again
    assert loaded.cfg == model.cfg


def test_a_checkpoint_of_another_size_is_prepared_as_released_at_that_size(tmp_path):
    """A 384 px file under a 224 px name is evaluated as its own codebase evaluates it: uncropped, as timm's
    vit_*_384 (the Google fine-tunes), whatever alias names the architecture."""
    width, heads, mlp, patch, _ = SHAPES["ViT-Ti/16"]
    google_npz(tmp_path / "ti384.npz", width, heads, mlp, patch, grid=(24, 24))
    google_npz(tmp_path / "ti224.npz", width, heads, mlp, patch, grid=(14, 14))
    for name in ("ViT-Ti/16", "vit_tiny_patch16_224", "vit_tiny_patch16_384"):
        model = vitkit.create_model(name, weights=tmp_path / "ti384.npz", depth=1)
        assert model.cfg.img_size == (384, 384) and model.preprocess["crop_pct"] == 1.0, name
    assert vitkit.create_model("vit_tiny_patch16_384", weights=tmp_path / "ti224.npz", depth=1).preprocess[
        "crop_pct"] == 0.9  # and the other way round: the 224 px release's crop
    # torchvision's name has no 384 px sibling of its normalisation: its own, uncropped
    tv_file = tmp_path / "tv384.pth"
    torch.save(randomize(tv.VisionTransformer(384, 16, 1, 3, 192, 768)).state_dict(), tv_file)
    model = vitkit.create_model("vit_b_16", weights=tv_file, width=192, num_heads=3, mlp_dim=768, depth=1)
    assert model.cfg.img_size == (384, 384) and model.preprocess["crop_pct"] == 1.0
    assert model.preprocess["mean"] == (0.485, 0.456, 0.406)


def test_a_head_that_read_the_dropped_pre_logits_layer_goes_too(tmp_path, caplog):
    """The paper's fine-tuning replaces the whole pre-training head: a model built without the pre-logits layer
    gets a zero head even where the checkpoint's head has the right shape (it read the dropped layer's output)."""
    width, heads, mlp, patch, _ = SHAPES["ViT-Ti/16"]
    google_npz(tmp_path / "rep.npz", width, heads, mlp, patch, rep=width)
    with_it = vitkit.create_model("ViT-Ti/16", weights=tmp_path / "rep.npz", depth=1)
    assert with_it.cfg.representation_size == width and with_it.head.weight.any()
    with caplog.at_level(logging.WARNING, logger="vitkit"):
        without = vitkit.create_model("ViT-Ti/16", weights=tmp_path / "rep.npz", depth=1, representation_size=None)
    assert without.cfg.representation_size is None and not without.head.weight.any() and not without.head.bias.any()
    assert "head replaced: the pre-training head (pre-logits layer + classifier) goes, as the paper fine-tunes" \
        in caplog.text and "pre-logits layer of the checkpoint dropped" not in caplog.text
    assert torch.equal(without.blocks[0].mlp.fc1.weight, with_it.blocks[0].mlp.fc1.weight)


def test_transformers_processor_sizes_and_resampling_as_transformers_reads_them(tmp_path, caplog):
    from transformers import BitImageProcessor

    hf_vit("ViT-Ti/16").save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({  # the hybrid's: a number is the short side
        "image_processor_type": "BitImageProcessor", "size": 256, "crop_size": 224, "do_center_crop": True,
        "resample": 1}))
    assert BitImageProcessor.from_pretrained(tmp_path).size["shortest_edge"] == 256
    with caplog.at_level(logging.WARNING, logger="vitkit"):
        pre = read_checkpoint(tmp_path).preprocess
    assert pre["crop_mode"] == "center" and pre["crop_pct"] == 224 / 256
    assert pre["interpolation"] == "bicubic" and "resample 1 resized as bicubic" in caplog.text  # lanczos: loads


def test_a_transformers_directory_says_its_own_architecture(tmp_path, capsys):
    """config.json holds the width, depth, heads and image size: load_model and the commands need no --model (a
    3-layer model at 160 px, which no name has); a timm file still needs one, and says so."""
    peer = hf_vit("ViT-Ti/16", depth=3, image_size=160)
    peer.save_pretrained(tmp_path / "hf")
    with torch.no_grad():
        ref = peer(pixel_values=images(160)).logits
    model = vitkit.load_model(tmp_path / "hf")
    assert (len(model.blocks), model.cfg.img_size, model.cfg.num_heads) == (3, (160, 160), 3)
    assert_close(logits(model, 160), ref)
    Image.fromarray(np.asarray(images(160, n=1)[0].permute(1, 2, 0).mul(127).add(128).clamp(0, 255),
                               dtype=np.uint8)).save(tmp_path / "x.png")
    assert main(["predict", str(tmp_path / "x.png"), "--weights", str(tmp_path / "hf"), "--top-k", "1"]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'x.png'}: ")
    # its weights file, named alone: read with its folder's config.json, as the folder is
    assert main(["predict", str(tmp_path / "x.png"), "--weights", str(tmp_path / "hf" / "model.safetensors"),
                 "--top-k", "1"]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'x.png'}: ")
    timm_file = timm_case(tmp_path)[0]
    with pytest.raises(CheckpointError, match=r"a timm checkpoint, which does not say its architecture: name it "
                                              r"\(--model NAME"):
        vitkit.load_model(timm_file)


def test_broken_metadata_is_said_not_silently_fixed(tmp_path, caplog):
    """Class names of another length than the head, or no mean/std: notes, not silently other numbers."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tmp_path / "m.safetensors"
    model = vitkit.create_model("ViT-Ti/16", depth=1, num_classes=3)
    model.class_names = ["a", "b", "c"]
    vitkit.save_model(model, path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    inner = json.loads(meta["config"])  # the whole metadata: config, preprocess, class names, ...
    inner["class_names"] = ["a", "b"]
    inner["preprocess"] = {k: v for k, v in inner["preprocess"].items() if k != "std"}
    save_file(load_file(path), tmp_path / "broken.safetensors", metadata={**meta, "config": json.dumps(inner)})
    loaded = vitkit.load_model(tmp_path / "broken.safetensors")
    assert loaded.class_names is None
    assert "its 2 class names do not fit its 3-class head: left out" in caplog.text
    assert "its metadata gives no input std: vitkit's default std (0.5, 0.5, 0.5) is used" in caplog.text
