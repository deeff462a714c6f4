"""Checkpoint parity: each peer builds a model with random weights and saves it its own way; vitkit loads the
file and must give the peer's logits (max abs difference <= 1e-4, float32) at the native resolution and at a
changed one, where the peer resamples position embeddings its own way."""
from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import vitkit
from vitkit.weights import read_checkpoint
from weight_peers import (CLASSES, SHAPES, assert_close, google_npz, hf_vit, images, randomize, save_timm,
                          timm_from_npz, timm_reference, tv, tv_vit, vitkit_logits)

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
from timm.layers import resample_abs_pos_embed  # noqa: E402

SIZES = [224, 288]  # checkpoints are made at 224: native, and a changed resolution (resampled position embeddings)
HYBRID = (3, 4, 9)  # R50 stem, kept whole; the transformer is reduced to one block
HYBRID_SIZES = (128, 160)  # native (a 8x8 grid) and changed; small, one image: the R50 stem dominates the time


@pytest.fixture(scope="module")
def timm_hybrid():
    """One random R50+ViT-B/16 (one transformer block) for the hybrid tests of every format."""
    return randomize(timm.create_model("vit_base_r50_s16_224", depth=1, num_classes=CLASSES, img_size=128))


# --- Google .npz ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", SHAPES)
def test_npz_parity(tmp_path, name, size):
    width, heads, mlp, patch, _ = SHAPES[name]
    path = tmp_path / "vit.npz"
    google_npz(path, width, heads, mlp, patch, grid=(224 // patch,) * 2)
    with torch.no_grad():
        ref = timm_from_npz(path, width, heads, mlp, patch, size)(images(size))
    assert_close(vitkit_logits(name, path, size), ref)


@pytest.mark.parametrize("layout, cls, prefix, size", [
    ("vit", False, "opt/target/", 224),  # gap classifier, no [class] token
    ("big_vision", True, "params/", 224),  # scanned blocks, pos_embedding without the [class] position
    ("big_vision", True, "params/", 160),  # ... resampled down
    ("big_vision", False, "", (224, 288)),  # gap, non-square resampling
])
def test_npz_layouts(tmp_path, layout, cls, prefix, size):
    width, heads, mlp, patch, _ = SHAPES["ViT-Ti/16"]
    path = tmp_path / "vit.npz"
    google_npz(path, width, heads, mlp, patch, depth=2, layout=layout, cls=cls, prefix=prefix)
    with torch.no_grad():
        ref = timm_from_npz(path, width, heads, mlp, patch, size, cls=cls, big_vision=layout != "vit",
                            depth=2)(images(size))
    model = vitkit.create_model("ViT-Ti/16", weights=path, img_size=size, depth=2)
    assert model.cfg.pool == ("token" if cls else "gap") and model.preprocess["mean"] == (0.5, 0.5, 0.5)
    with torch.no_grad():
        assert_close(model(images(size)), ref)


def test_npz_pre_logits(tmp_path):
    """In21k-style checkpoints have the pre-logits layer (Linear + tanh); timm no longer loads it, so the
    reference applies it to timm's pooled features by hand."""
    width, heads, mlp, patch, _ = SHAPES["ViT-Ti/16"]
    path = tmp_path / "vit.npz"
    w = google_npz(path, width, heads, mlp, patch, rep=width)
    peer = timm_from_npz(path, width, heads, mlp, patch, 224)
    with torch.no_grad():
        feats = peer.forward_head(peer.forward_features(images(224)), pre_logits=True)
        t = {k: torch.from_numpy(w[k]) for k in ("pre_logits/kernel", "pre_logits/bias", "head/kernel", "head/bias")}
        ref = torch.tanh(feats @ t["pre_logits/kernel"] + t["pre_logits/bias"]) @ t["head/kernel"] + t["head/bias"]
    assert_close(vitkit_logits("ViT-Ti/16", path, 224), ref)


def test_npz_hybrid_parity(tmp_path):
    path = tmp_path / "r50.npz"
    google_npz(path, 768, 12, 3072, 1, grid=(8, 8), hybrid=HYBRID)
    for size in HYBRID_SIZES:
        peer = timm.create_model("vit_base_r50_s16_224", depth=1, num_classes=CLASSES, img_size=size).eval()
        peer.load_pretrained(str(path))
        with torch.no_grad():
            ref = peer(images(size, 1))
        assert_close(vitkit_logits("R50+ViT-B/16", path, size, n=1), ref)


# --- timm and DeiT -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name, ext", [(n, ".pth") for n in SHAPES] + [("ViT-Ti/16", ".safetensors"),
                                                                      ("ViT-Ti/16", ".bin")])
def test_timm_parity(tmp_path, name, ext, size):
    timm_name = SHAPES[name][-1]
    path = tmp_path / f"model{ext}"
    save_timm(randomize(timm.create_model(timm_name, depth=1, num_classes=CLASSES)), path)
    assert_close(vitkit_logits(name, path, size), timm_reference(timm_name, path, size, depth=1))


def test_timm_hybrid_parity(tmp_path, timm_hybrid):
    path = tmp_path / "r50.safetensors"
    save_timm(timm_hybrid, path)
    for size in HYBRID_SIZES:
        assert_close(vitkit_logits("R50+ViT-B/16", path, size, n=1),
                     timm_reference("vit_base_r50_s16_224", path, size, n=1, depth=1))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("timm_name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_deit_parity(tmp_path, size, timm_name):
    """Distilled DeiT: a second (distillation) token with its own head; at inference the two heads average."""
    path = tmp_path / "deit_tiny.pth"
    save_timm(randomize(timm.create_model(timm_name, depth=1, num_classes=CLASSES)), path, container=True)
    model = vitkit.create_model("ViT-Ti/16", weights=path, img_size=size, depth=1)  # the file tells "distilled"
    assert model.preprocess["mean"] == (0.485, 0.456, 0.406)  # the container says DeiT: ImageNet statistics
    assert model.num_prefix_tokens == 1 + ("distilled" in timm_name)
    with torch.no_grad():
        assert_close(model(images(size)), timm_reference(timm_name, path, size, depth=1))
    tuned = vitkit.create_model("ViT-Ti/16", weights=path, depth=1, num_classes=3)  # fine-tuning: new zero heads
    assert not any(p.any() for n, p in tuned.named_parameters() if n.startswith("head"))


# --- transformers --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", SHAPES)
def test_transformers_parity(tmp_path, name, size):
    peer = hf_vit(name)
    peer.save_pretrained(tmp_path)
    with torch.no_grad():
        ref = peer(pixel_values=images(size), interpolate_pos_encoding=True).logits
    model = vitkit.create_model(name, weights=tmp_path, img_size=size, depth=1)
    assert model.cfg.norm_eps == 1e-12 and model.preprocess["mean"] == (0.5, 0.5, 0.5)
    with torch.no_grad():
        assert_close(model(images(size)), ref)


def test_transformers_vitmodel_bin_shards_and_downscale(tmp_path):
    """ViTModel (pooler -> pre_logits, no classifier), a sharded save, the pytorch_model.bin of transformers 4
    (torch pickle of the same tensors), and a smaller resolution: transformers does not antialias, timm would."""
    peer = hf_vit("ViT-Ti/16", depth=2, cls=transformers.ViTModel)
    peer.save_pretrained(tmp_path / "sharded", max_shard_size="1MB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    peer.save_pretrained(tmp_path / "bin")
    torch.save(load_file(str(tmp_path / "bin" / "model.safetensors")), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "model.safetensors").unlink()
    for size in (224, 160):
        with torch.no_grad():
            ref = peer(pixel_values=images(size), interpolate_pos_encoding=True).pooler_output
        for folder in ("sharded", "bin"):
            model = vitkit.create_model("ViT-Ti/16", weights=tmp_path / folder, img_size=size, depth=2)
            assert model.cfg.num_classes == 0 and model.cfg.representation_size == 192
            with torch.no_grad():
                assert_close(model(images(size)), ref)


def test_transformers_preprocessor_and_labels(tmp_path):
    peer = hf_vit("ViT-Ti/16", id2label={i: f"class {i}" for i in range(CLASSES)})
    peer.save_pretrained(tmp_path)
    transformers.ViTImageProcessor(image_mean=[0.4, 0.4, 0.4], image_std=[0.2, 0.2, 0.2], resample=3).save_pretrained(
        tmp_path)
    model = vitkit.create_model("ViT-Ti/16", weights=tmp_path, depth=1)
    assert model.class_names == [f"class {i}" for i in range(CLASSES)]
    assert model.preprocess == {"mean": (0.4, 0.4, 0.4), "std": (0.2, 0.2, 0.2), "interpolation": "bicubic",
                                "crop_pct": 1.0, "crop_mode": "squash"}
    # the processor's pixels: a non-square photo resized on both sides to 224x224, nothing cropped away
    from PIL import Image

    from vitkit.data.images import eval_transform

    photo = Image.effect_mandelbrot((400, 260), (-2.0, -1.2, 0.8, 1.2), 60).convert("RGB")
    ref = transformers.ViTImageProcessor.from_pretrained(tmp_path)(images=photo, return_tensors="pt")["pixel_values"]
    ours = eval_transform(model.preprocess, (224, 224))(photo)
    assert (ours - ref[0]).abs().max() <= 1.01 / 255 / 0.2  # at most one grey level apart (PIL vs torch resizing)
    # state dicts without config.json: the file's names, and transformers 5's module names (q_proj, ...)
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in peer.state_dict().items()}, str(bare))
    with torch.no_grad():
        ref = peer(pixel_values=images(224)).logits
    for path in (tmp_path / "model.safetensors", bare):
        assert_close(vitkit_logits("ViT-Ti/16", path, 224), ref)


_BIT = "vit.embeddings.patch_embeddings.backbone.bit."
# timm name -> transformers 4.x ViTHybrid name (transformers' own timm conversion script lists these pairs)
_HF_HYBRID = [(re.compile(a), b) for a, b in [
    (r"patch_embed\.backbone\.stem\.conv\.", _BIT + "embedder.convolution."),
    (r"patch_embed\.backbone\.stem\.norm\.", _BIT + "embedder.norm."),
    (r"patch_embed\.backbone\.stages\.(\d+)\.blocks\.", _BIT + r"encoder.stages.\1.layers."),
    (r"patch_embed\.proj\.", "vit.embeddings.patch_embeddings.projection."),
    (r"cls_token", "vit.embeddings.cls_token"), (r"pos_embed", "vit.embeddings.position_embeddings"),
    (r"blocks\.(\d+)\.norm1\.", r"vit.encoder.layer.\1.layernorm_before."),
    (r"blocks\.(\d+)\.norm2\.", r"vit.encoder.layer.\1.layernorm_after."),
    (r"blocks\.(\d+)\.attn\.proj\.", r"vit.encoder.layer.\1.attention.output.dense."),
    (r"blocks\.(\d+)\.mlp\.fc1\.", r"vit.encoder.layer.\1.intermediate.dense."),
    (r"blocks\.(\d+)\.mlp\.fc2\.", r"vit.encoder.layer.\1.output.dense."),
    (r"norm\.", "vit.layernorm."), (r"head\.", "classifier."),
]]


def hf_hybrid_dir(folder, timm_model):
    """A ViTHybridForImageClassification save_pretrained directory (transformers 4.x; 5.x removed the class),
    written from a timm hybrid."""
    out = {}
    for key, value in timm_model.state_dict().items():
        if m := re.match(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", key):
            for part, chunk in zip(("query", "key", "value"), value.chunk(3)):
                out[f"vit.encoder.layer.{m[1]}.attention.attention.{part}.{m[2]}"] = chunk.contiguous()
            continue
        pattern, repl = next((p, r) for p, r in _HF_HYBRID if p.match(key))
        out[pattern.sub(repl, key, count=1)] = value
    folder.mkdir()
    save_file(out, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["ViTHybridForImageClassification"], "model_type": "vit-hybrid", "hidden_act": "gelu",
        "backbone_config": {"depths": list(HYBRID), "layer_type": "bottleneck", "global_padding": "SAME",
                            "model_type": "bit", "out_features": ["stage3"], "embedding_dynamic_padding": True},
        "hidden_size": 768, "num_attention_heads": 12, "num_hidden_layers": 1, "intermediate_size": 3072,
        "image_size": 128, "patch_size": 1, "layer_norm_eps": 1e-6, "qkv_bias": True,  # timm's eps: same model
        "id2label": {str(i): f"LABEL_{i}" for i in range(CLASSES)}}))
    return out


def test_transformers_hybrid_layout(tmp_path, timm_hybrid):
    """transformers 5 has no ViTHybrid to save one, so the layout is written from timm's hybrid. (Checked by hand
    against transformers 4.46's ViTHybridForImageClassification and ViTHybridModel: max abs diff ~1e-6.) Its
    interpolate_pos_encoding fails for the hybrid, so at another size the reference is timm's model with the
    position embeddings resampled the way transformers' ViT does it: bicubic, no antialiasing."""
    keys = hf_hybrid_dir(tmp_path / "hybrid", timm_hybrid)
    assert _BIT + "encoder.stages.2.layers.8.conv3.weight" in keys and "vit.layernorm.weight" in keys
    for size in HYBRID_SIZES:
        state = dict(timm_hybrid.state_dict())
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], [size // 16] * 2, antialias=False)
        peer = timm.create_model("vit_base_r50_s16_224", depth=1, num_classes=CLASSES, img_size=size).eval()
        peer.load_state_dict(state)
        with torch.no_grad():
            ref = peer(images(size, 1))
        assert_close(vitkit_logits("R50+ViT-B/16", tmp_path / "hybrid", size, n=1), ref)


# --- torchvision ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, size", [(n, s) for n in SHAPES for s in SIZES] + [("ViT-Ti/16", 160)])
def test_torchvision_parity(tmp_path, name, size):
    peer = randomize(tv_vit(name))
    path = tmp_path / "tv.pth"
    torch.save(peer.state_dict(), path)
    if size != 224:  # torchvision's own resampling, then its model at the new size
        state = tv.interpolate_embeddings(size, SHAPES[name][3], dict(peer.state_dict()))
        peer = tv_vit(name, size)
        peer.load_state_dict(state)
    with torch.no_grad():
        ref = peer.eval()(images(size))
    model = vitkit.create_model(name, weights=path, img_size=size, depth=1)
    assert model.preprocess["mean"] == (0.485, 0.456, 0.406) and model.class_names is None
    with torch.no_grad():
        assert_close(model(images(size)), ref)


@pytest.mark.parametrize("cls", [False, True])
def test_timm_gap_fc_norm_parity(tmp_path, cls):
    from timm.models.vision_transformer import VisionTransformer
    peer = randomize(VisionTransformer(img_size=224, patch_size=16, embed_dim=192, depth=1, num_heads=3,
                                       num_classes=CLASSES, class_token=cls, global_pool="avg", fc_norm=True))
    path = tmp_path / "gap.safetensors"
    save_timm(peer, path)
    model = vitkit.create_model("ViT-Ti/16", weights=path, depth=1)
    assert model.cfg.pool == "gap" and model.cfg.fc_norm
    with torch.no_grad():
        assert_close(model(images(224)), peer(images(224)))


def test_timm_without_qkv_bias(tmp_path):
    peer = randomize(timm.create_model("vit_tiny_patch16_224", depth=1, num_classes=CLASSES, qkv_bias=False))
    path = tmp_path / "nobias.pth"
    save_timm(peer, path)
    model = vitkit.create_model("ViT-Ti/16", weights=path, depth=1)
    assert not model.cfg.qkv_bias
    with torch.no_grad():
        assert_close(model(images(224)), peer(images(224)))


def test_timm_ddp_prefix_and_old_pre_logits_names(tmp_path):
    peer = randomize(timm.create_model("vit_tiny_patch16_224", depth=1, num_classes=CLASSES))
    torch.save({"module." + k: v for k, v in peer.state_dict().items()}, tmp_path / "ddp.pth")
    assert_close(vitkit_logits("ViT-Ti/16", tmp_path / "ddp.pth", 224), peer(images(224)).detach())
    src = vitkit.create_model("ViT-Ti/16", img_size=224, depth=1, representation_size=192, num_classes=CLASSES)
    randomize(src)
    old = {k.replace("pre_logits.", "pre_logits.fc."): v for k, v in src.state_dict().items()}
    torch.save(old, tmp_path / "old.pth")
    model = vitkit.create_model("ViT-Ti/16", weights=tmp_path / "old.pth", depth=1)
    assert model.cfg.representation_size == 192
    with torch.no_grad():
        assert_close(model(images(224)), src(images(224)))


def test_npz_bfloat16_arrays(tmp_path):
    path32, path16 = tmp_path / "f32.npz", tmp_path / "bf16.npz"
    w = google_npz(path32, *SHAPES["ViT-Ti/16"][:4])

    def bf16(a):  # float32 -> bfloat16 (truncated), stored the way JAX's np.asarray(bf16 array) is: dtype V2
        return (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view("V2")
    np.savez(path16, **{k: bf16(v) for k, v in w.items()})
    sd32, sd16 = read_checkpoint(path32).state_dict, read_checkpoint(path16).state_dict
    for k, v in sd32.items():
        assert sd16[k].dtype == torch.float32
        assert torch.allclose(sd16[k], v, rtol=1e-2, atol=1e-6), k  # bfloat16 keeps ~3 significant digits


def test_non_square_checkpoint_resampled_to_another_non_square_size(tmp_path):
    peer = randomize(timm.create_model("vit_tiny_patch16_224", img_size=(224, 320), depth=1, num_classes=CLASSES))
    path = tmp_path / "wide.pth"
    save_timm(peer, path)
    size = (112, 160)  # 7x10: same aspect ratio, so the file's 280 positions are read as 14x20
    from timm.layers import resample_abs_pos_embed
    state = dict(peer.state_dict())
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], [7, 10], [14, 20], num_prefix_tokens=1)
    ref = timm.create_model("vit_tiny_patch16_224", img_size=size, depth=1, num_classes=CLASSES).eval()
    ref.load_state_dict(state)
    with torch.no_grad():
        assert_close(vitkit_logits("ViT-Ti/16", path, size), ref(images(size)))


def test_transformers_bare_state_dict_gets_transformers_eps(tmp_path):
    peer = hf_vit("ViT-Ti/16")
    save_file({k: v.contiguous() for k, v in peer.state_dict().items()}, str(tmp_path / "bare.safetensors"))
    assert read_checkpoint(tmp_path / "bare.safetensors").config["norm_eps"] == 1e-12
    assert vitkit.create_model("ViT-Ti/16", weights=tmp_path / "bare.safetensors", depth=1).cfg.norm_eps == 1e-12


def test_vitkit_file_converted_from_torchvision_resamples_as_torchvision(tmp_path):
    """A converted file keeps its source's way of resampling position embeddings, so it changes resolution with
    the source library's logits, as the file it came from does."""
    peer = randomize(tv_vit("ViT-Ti/16"))
    torch.save(peer.state_dict(), tmp_path / "tv.pth")
    converted = vitkit.save_model(vitkit.create_model("vit_b_16", weights=tmp_path / "tv.pth", width=192,
                                                      num_heads=3, mlp_dim=768, depth=1), tmp_path / "tv.safetensors")
    state = tv.interpolate_embeddings(288, 16, dict(peer.state_dict()))
    peer = tv_vit("ViT-Ti/16", 288)
    peer.load_state_dict(state)
    with torch.no_grad():
        ref = peer.eval()(images(288))
        assert_close(vitkit.load_model(converted, img_size=288)(images(288)), ref)
        # and a model trained on from it is saved with that way too
        resaved = vitkit.save_model(vitkit.load_model(converted), tmp_path / "again.safetensors")
        assert_close(vitkit.load_model(resaved, img_size=288)(images(288)), ref)


def test_transpose_of_a_non_square_vitkit_checkpoint_is_resampled(tmp_path):
    peer = randomize(timm.create_model("vit_tiny_patch16_224", img_size=(224, 320), depth=1, num_classes=CLASSES))
    save_timm(peer, tmp_path / "wide.pth")
    wide = vitkit.save_model(vitkit.create_model("ViT-Ti/16", weights=tmp_path / "wide.pth", img_size=(224, 320),
                                                 depth=1), tmp_path / "wide.safetensors")
    for size in ((320, 224), (256, 256)):  # as many positions on the transposed grid; a square one
        state = dict(peer.state_dict())
        grid = [s // 16 for s in size]
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], grid, [14, 20], num_prefix_tokens=1)
        ref = timm.create_model("vit_tiny_patch16_224", img_size=size, depth=1, num_classes=CLASSES).eval()
        ref.load_state_dict(state)
        with torch.no_grad():
            assert_close(vitkit.load_model(wide, img_size=size)(images(size)), ref(images(size)))


@pytest.mark.parametrize("legacy", [True, False])
def test_deit_image_processor_pixels(tmp_path, legacy):
    """DeiTImageProcessor: both sides to 256, then a 224 center crop; older files say the sizes as numbers."""
    from PIL import Image

    from vitkit.data.images import eval_transform

    hf_vit("ViT-Ti/16").save_pretrained(tmp_path)
    processor = transformers.DeiTImageProcessor(size=256, crop_size=224) if not legacy else None
    if legacy:  # as facebook/deit-*-patch16-224 on the hub still have it
        (tmp_path / "preprocessor_config.json").write_text(json.dumps({
            "do_center_crop": True, "do_normalize": True, "do_resize": True, "image_processor_type": "DeiTImageProcessor",
            "size": 256, "crop_size": 224, "resample": 3, "image_mean": [0.485, 0.456, 0.406],
            "image_std": [0.229, 0.224, 0.225]}))
        processor = transformers.DeiTImageProcessor.from_pretrained(tmp_path)
    else:
        processor.save_pretrained(tmp_path)
    model = vitkit.create_model("ViT-Ti/16", weights=tmp_path, depth=1)
    assert model.preprocess["crop_pct"] == 224 / 256 and model.preprocess["crop_mode"] == "squash"
    photo = Image.effect_mandelbrot((400, 260), (-2.0, -1.2, 0.8, 1.2), 60).convert("RGB")
    ref = processor(images=photo, return_tensors="pt")["pixel_values"][0]
    ours = eval_transform(model.preprocess, (224, 224))(photo)
    assert (ours - ref).abs().max() <= 1.01 / 255 / 0.224  # at most one grey level apart (PIL vs torch resizing)


def _hf_deit(cls, **kw):
    config = transformers.DeiTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                     image_size=32, patch_size=8, num_labels=CLASSES, **kw)
    return randomize(cls(config)).eval()


@pytest.mark.parametrize("size", [32, 48])
def test_transformers_deit_with_teacher_and_bare(tmp_path, size):
    """transformers' distilled DeiT (facebook/deit-*-distilled-*): both heads averaged, as in its own forward; its
    processor's defaults (256 -> 224 crop, 0.5 mean and std) without a preprocessor_config.json."""
    peer = _hf_deit(transformers.DeiTForImageClassificationWithTeacher)
    peer.save_pretrained(tmp_path / "teacher")
    model = vitkit.load_model(tmp_path / "teacher", img_size=size)
    assert model.cfg.distilled and model.preprocess["crop_pct"] == 224 / 256
    want = transformers.DeiTImageProcessor()  # its defaults: the mean, std and sizes it prepares pixels with
    assert model.preprocess["mean"] == tuple(want.image_mean) and model.preprocess["std"] == tuple(want.image_std)
    with torch.no_grad():
        assert_close(model(images(size)), peer(images(size), interpolate_pos_encoding=True).logits)
    bare = _hf_deit(transformers.DeiTModel)
    bare.save_pretrained(tmp_path / "bare")
    model = vitkit.load_model(tmp_path / "bare")
    with torch.no_grad():
        assert_close(model.forward_features(images(32)), bare(images(32)).last_hidden_state)
        assert_close(model(images(32)), bare(images(32)).last_hidden_state[:, :2].mean(1))  # pooler left out
    _hf_deit(transformers.DeiTForImageClassification).save_pretrained(tmp_path / "single")
    with pytest.raises(vitkit.CheckpointError, match="DeiTForImageClassification .* is not supported"):
        vitkit.load_model(tmp_path / "single")


def test_transformers_masked_image_modeling_one_channel_and_a_stray_pooler(tmp_path, caplog):
    """ViTForMaskedImageModeling: its encoder (the decoder left out); num_channels 1; a pooler saved beside a
    classifier, which ViTForImageClassification never runs (transformers leaves it out; reading it as a pre-logits
    layer moved the logits by about 1)."""
    mim = hf_vit("ViT-Ti/16", depth=2, cls=transformers.ViTForMaskedImageModeling, encoder_stride=16,
                 id2label={i: f"c{i}" for i in range(CLASSES)}).eval()
    mim.save_pretrained(tmp_path / "mim")
    with torch.no_grad():
        assert_close(vitkit.load_model(tmp_path / "mim").forward_features(images(224)),
                     mim.vit(images(224)).last_hidden_state)
    gray = hf_vit("ViT-Ti/16", num_channels=1).eval()
    gray.save_pretrained(tmp_path / "gray")
    sd = load_file(str(tmp_path / "gray" / "model.safetensors"))
    sd.update({"vit.pooler.dense.weight": torch.randn(192, 192), "vit.pooler.dense.bias": torch.randn(192)})
    save_file(sd, str(tmp_path / "gray" / "model.safetensors"), metadata={"format": "pt"})
    x = images(224)[:, :1]
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="vitkit"):
        vitkit.load_model(tmp_path / "mim")  # headless, with class names in its config: no note about them
        assert "class names" not in caplog.text
        model = vitkit.load_model(tmp_path / "gray")
        assert model.cfg.in_chans == 1 and model.cfg.representation_size is None
        assert_close(model(x), gray(x).logits)
    assert "pooler weights left out: beside a classifier" in caplog.text


@pytest.mark.parametrize("processor, mean, std", [
    ({"do_normalize": False}, (0.0,) * 3, (1.0,) * 3),
    ({"rescale_factor": None}, (0.5,) * 3, (0.5,) * 3),  # (null in the file: the default)
    ({"do_rescale": False, "image_mean": [127.5] * 3, "image_std": [63.75] * 3}, (0.5,) * 3, (0.25,) * 3),
    ({"rescale_factor": 1 / 127.5, "image_mean": [1, 1, 1], "image_std": [1, 1, 1]}, (0.5,) * 3, (0.5,) * 3),
])
def test_transformers_rescale_and_normalize_flags(tmp_path, processor, mean, std):
    """(x * rescale_factor - mean) / std of 0-255 pixels, as vitkit's (x / 255 - mean') / std': the same pixels."""
    from PIL import Image

    from vitkit.data.images import eval_transform

    hf_vit("ViT-Ti/16").save_pretrained(tmp_path)
    hf = transformers.ViTImageProcessor(**{k: v for k, v in processor.items() if v is not None})
    hf.save_pretrained(tmp_path)
    if None in processor.values():  # a value transformers would not write
        config = json.loads((tmp_path / "preprocessor_config.json").read_text())
        (tmp_path / "preprocessor_config.json").write_text(json.dumps({**config, **processor}))
    model = vitkit.load_model(tmp_path)
    assert model.preprocess["mean"] == pytest.approx(mean) and model.preprocess["std"] == pytest.approx(std)
    photo = Image.effect_mandelbrot((400, 260), (-2.0, -1.2, 0.8, 1.2), 60).convert("RGB")
    ours = eval_transform(model.preprocess, (224, 224))(photo)
    ref = hf(images=photo, return_tensors="pt")["pixel_values"][0]
    assert (ours - ref).abs().max() <= 1.01 / 255 / min(std)  # at most one grey level apart (PIL vs torch resizing)


def test_a_multi_label_transformers_head_gives_sigmoid_probabilities(tmp_path):
    """problem_type multi_label_classification: each class scored on its own, as transformers' pipeline does (a
    softmax made them compete); kept through a vitkit file, gone with the head when fine-tuning replaces it."""
    peer = hf_vit("ViT-Ti/16", problem_type="multi_label_classification",
                  id2label={i: f"tag {i}" for i in range(CLASSES)}).eval()
    peer.save_pretrained(tmp_path / "hf")
    model = vitkit.load_model(tmp_path / "hf")
    x = images(224, n=1)
    with torch.no_grad():
        ref = peer(x).logits.sigmoid()[0]
    got = vitkit.predict.probabilities(model, model(x))[0]
    assert model.multi_label and torch.allclose(got, ref, atol=1e-5) and got.sum() > 1.5
    vitkit.save_model(model, tmp_path / "ml.safetensors")
    assert vitkit.load_model(tmp_path / "ml.safetensors").multi_label
    assert not vitkit.load_model(tmp_path / "ml.safetensors", num_classes=3).multi_label  # a new head
