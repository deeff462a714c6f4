"""Downloading by name, against local stand-ins: huggingface_hub's snapshot_download is replaced by a copy from a
local folder, and URLs are served by http.server on 127.0.0.1. The loading after the download is the real one."""
from __future__ import annotations

import json
import shutil
import types

import pytest
import torch

import vitkit
from vitkit.weights import CheckpointError
from weight_peers import (CLASSES, SHAPES, assert_close, google_npz, hf_vit, images, randomize, save_timm,
                          timm_from_npz, vitkit_logits)

huggingface_hub = pytest.importorskip("huggingface_hub")
timm = pytest.importorskip("timm")
TI = SHAPES["ViT-Ti/16"][:4]


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """repos: repo id -> local folder. Records every snapshot_download call; copies the files the call's
    allow_patterns select, as the real function does, into a snapshot folder."""
    repos, calls = {}, []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **_):
        calls.append((repo_id, revision, tuple(allow_patterns or ())))
        if repo_id not in repos:
            url = f"https://huggingface.co/api/models/{repo_id}"
            raise huggingface_hub.errors.RepositoryNotFoundError(
                f"404 Client Error. Repository Not Found for url: {url}\nPlease make sure ...",
                response=types.SimpleNamespace(headers={}, request=url))
        dest = tmp_path / "hub" / repo_id / (revision or "main")
        dest.mkdir(parents=True, exist_ok=True)
        for f in repos[repo_id].iterdir():
            if any(f.match(p) for p in allow_patterns or ["*"]):
                shutil.copy(f, dest / f.name)
        return str(dest)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return repos, calls


def test_hf_hub_transformers_repo(tmp_path, fake_hub):
    repos, calls = fake_hub
    peer = hf_vit("ViT-Ti/16")
    peer.save_pretrained(tmp_path / "repo")
    repos["google/vit-tiny"] = tmp_path / "repo"
    with torch.no_grad():
        ref = peer(pixel_values=images(224)).logits
    assert_close(vitkit_logits("ViT-Ti/16", "hf-hub:google/vit-tiny@v1.0", 224), ref)
    assert calls == [("google/vit-tiny", "v1.0", ("*.json", "*.safetensors"))]


def _timm_repo(folder, repos: dict, weights: str):
    """A 1-block timm ViT-Ti/16 saved as the hub repository timm/vit_tiny: `weights` and timm's config.json."""
    peer = randomize(timm.create_model("vit_tiny_patch16_224", depth=1, num_classes=CLASSES))
    folder.mkdir()
    save_timm(peer, folder / weights)
    (folder / "config.json").write_text('{"architecture": "vit_tiny_patch16_224", "num_classes": 10}')
    repos["timm/vit_tiny"] = folder
    return peer


def test_hf_hub_timm_repo_with_only_pickles(tmp_path, fake_hub):
    """A timm repository (config.json without model_type) holding only pytorch_model.bin: the second, narrower
    download fetches it, and it is read as a timm state dict with weights_only=True."""
    repos, calls = fake_hub
    peer = _timm_repo(tmp_path / "repo", repos, "pytorch_model.bin")
    with torch.no_grad():
        ref = peer(images(224))
    assert_close(vitkit_logits("ViT-Ti/16", "hf-hub:timm/vit_tiny", 224), ref)
    assert [c[2] for c in calls] == [("*.json", "*.safetensors"), ("*.json", "*.bin", "*.pth", "*.npz")]


def test_hf_hub_missing_repo_is_one_line(fake_hub):
    with pytest.raises(CheckpointError) as e:
        vitkit.create_model("ViT-Ti/16", weights="hf-hub:nobody/nothing")
    msg = str(e.value)
    assert msg.startswith("hf-hub:nobody/nothing: download failed (RepositoryNotFoundError") and "\n" not in msg


def test_url_download_is_cached(tmp_path, http_root):
    root, base, server = http_root
    google_npz(root / "ViT-Ti_16.npz", *TI)
    ref = timm_from_npz(root / "ViT-Ti_16.npz", *TI, 224)
    with torch.no_grad():
        ref = ref(images(224))
    url = f"{base}/ViT-Ti_16.npz"
    assert_close(vitkit_logits("ViT-Ti/16", url, 224), ref)
    cached = list((tmp_path / "cache").rglob("ViT-Ti_16.npz"))
    assert len(cached) == 1 and cached[0].read_bytes() == (root / "ViT-Ti_16.npz").read_bytes()
    server.shutdown()  # the second load must come from the cache
    assert_close(vitkit_logits("ViT-Ti/16", url, 224), ref)


def test_url_not_found_is_one_line(http_root):
    _, base, _ = http_root
    with pytest.raises(CheckpointError) as e:
        vitkit.create_model("ViT-Ti/16", weights=f"{base}/missing.npz")
    msg = str(e.value)
    assert "missing.npz: download failed (HTTP Error 404" in msg and "\n" not in msg


def test_url_cache_is_per_url(tmp_path, http_root):
    root, base, _ = http_root
    for sub, seed in (("a", 0), ("b", 1)):
        (root / sub).mkdir()
        google_npz(root / sub / "ViT-Ti_16.npz", *TI, seed=seed)
    a = vitkit_logits("ViT-Ti/16", f"{base}/a/ViT-Ti_16.npz", 224)
    b = vitkit_logits("ViT-Ti/16", f"{base}/b/ViT-Ti_16.npz", 224)
    ref = timm_from_npz(root / "b" / "ViT-Ti_16.npz", *TI, 224)
    with torch.no_grad():
        assert_close(b, ref(images(224)))
    assert not torch.allclose(a, b)


def test_predict_url_of_a_vitkit_checkpoint_needs_no_model(tmp_path, http_root, capsys):
    root, base, _ = http_root
    from PIL import Image

    from vitkit.cli import main

    model = vitkit.create_model("ViT-Ti/16", img_size=32, depth=1, num_classes=3)
    model.class_names = ["ant", "bee", "cow"]
    vitkit.save_model(model, root / "tiny.safetensors")
    Image.new("RGB", (40, 30), "red").save(tmp_path / "red.png")
    assert main(["predict", str(tmp_path / "red.png"), "--weights", f"{base}/tiny.safetensors", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["top_k"][0]["label"] in model.class_names and len(out["top_k"]) == 3


def test_eval_of_a_vitkit_checkpoint_by_url(tmp_path, http_root, capsys):
    root, base, _ = http_root
    from vitkit.cli import main

    model = vitkit.ViT(vitkit.ViTConfig(img_size=8, patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=16,
                                        num_classes=10))
    model.class_names = [str(i) for i in range(10)]
    vitkit.save_model(model, root / "digits.safetensors")
    assert main(["eval", "--data", "digits", "--weights", f"{base}/digits.safetensors", "--json",
                 "--out", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] > 0


def test_a_timm_repository_names_its_model(tmp_path, fake_hub, capsys):
    """timm's hub repositories keep config.json ({"architecture": NAME}) beside the weights: load_model and the
    commands need no --model for them, nor for a weights file downloaded with that config beside it."""
    from PIL import Image

    from vitkit.cli import main

    repos, _ = fake_hub
    peer = _timm_repo(tmp_path / "repo", repos, "model.safetensors")
    with torch.no_grad():
        ref = peer(images(224))
    for spec in ("hf-hub:timm/vit_tiny", tmp_path / "repo" / "model.safetensors"):
        model = vitkit.load_model(spec, depth=1)
        with torch.no_grad():
            assert_close(model(images(224)), ref)
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "red.png")
    args = ["predict", str(tmp_path / "red.png"), "--weights", str(tmp_path / "repo" / "model.safetensors")]
    assert main([*args, "--set", "depth=1", "--top-k", "1"]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'red.png'}: ")
    (tmp_path / "repo" / "config.json").unlink()  # without it: the name is needed, and said to be
    with pytest.raises(CheckpointError, match=r"does not say its architecture: name it \(--model NAME"):
        vitkit.load_model(tmp_path / "repo" / "model.safetensors", depth=1)


def test_timm_save_for_hf_config_gives_arguments_preprocessing_and_class_names(tmp_path):
    """timm's save_for_hf: model_args (here patch 8 at 32 px, where the name says 16 at 224), pretrained_cfg's
    preprocessing (as timm's resolve_data_config reads it) and label_names, all read back by load_model."""
    from timm.models._hub import save_for_hf

    peer = randomize(timm.create_model("vit_tiny_patch16_224", patch_size=8, img_size=32, depth=1, num_classes=3))
    stats = {"mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6), "crop_pct": 0.95, "interpolation": "bilinear"}
    save_for_hf(peer.eval(), tmp_path, safe_serialization=True,
                model_config={"pretrained_cfg": stats, "label_names": ["cat", "dog", "eel"]})
    config = json.loads((tmp_path / "config.json").read_text())
    model = vitkit.load_model(tmp_path / "model.safetensors")
    with torch.no_grad():
        assert_close(model(images(32)), peer(images(32)))
    want = timm.data.resolve_data_config(pretrained_cfg=config["pretrained_cfg"])
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in model.preprocess.items()} == \
           {k: want[k] for k in ("mean", "std", "crop_pct", "interpolation", "crop_mode")}
    assert model.class_names == ["cat", "dog", "eel"] and model.cfg.patch_size == 8
    plain = {**config, "model_args": {**config["model_args"], "final_norm": True, "pos_embed": "learn"}}
    (tmp_path / "config.json").write_text(json.dumps(plain))  # timm's defaults, written out: the plain ViT
    assert vitkit.load_model(tmp_path / "model.safetensors").cfg.patch_size == 8
    for args, said in (({"pre_norm": True}, "pre_norm=True"), ({"final_norm": False}, "final_norm=False")):
        (tmp_path / "config.json").write_text(json.dumps({**config, "model_args": {**config["model_args"], **args}}))
        with pytest.raises(CheckpointError, match=rf"model_args {said}: not an architecture vitkit builds"):
            vitkit.load_model(tmp_path / "model.safetensors")  # said, not mis-built
    bad = {**config, "pretrained_cfg": {**config["pretrained_cfg"], "mean": "imagenet"}}
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match=r"config.json's pretrained_cfg mean must be a list of 3 numbers"):
        vitkit.load_model(tmp_path / "model.safetensors")
    lanczos = {**config, "pretrained_cfg": {**config["pretrained_cfg"], "interpolation": "lanczos"}}
    (tmp_path / "config.json").write_text(json.dumps(lanczos))  # timm's other filters: the nearest, said
    assert vitkit.load_model(tmp_path / "model.safetensors").preprocess["interpolation"] == "bicubic"
    from vitkit.predict import imagenet_wnids  # ImageNet's IDs as names: unnamed, so predict shows words

    wnids = {**config, "num_classes": 1000, "label_names": imagenet_wnids()}
    save_for_hf(randomize(timm.create_model("vit_tiny_patch16_224", depth=1)).eval(), tmp_path / "in1k",
                safe_serialization=True, model_config={"label_names": imagenet_wnids()})
    assert json.loads((tmp_path / "in1k" / "config.json").read_text())["label_names"] == wnids["label_names"]
    assert vitkit.load_model(tmp_path / "in1k" / "model.safetensors").class_names is None


def test_a_weights_file_of_a_transformers_folder_is_read_with_its_config(tmp_path):
    """model.safetensors named alone: its folder's config.json (eps 1e-6 here, class names) and processor count,
    as they do for the folder (read without them, eps 1e-12 moved the logits by ~1e-5)."""
    peer = hf_vit("ViT-Ti/16", layer_norm_eps=1e-6, id2label={i: f"c{i}" for i in range(CLASSES)}).eval()
    peer.save_pretrained(tmp_path / "hf")
    for model in (vitkit.load_model(tmp_path / "hf" / "model.safetensors"),
                  vitkit.create_model("ViT-Ti/16", weights=tmp_path / "hf" / "model.safetensors", depth=1)):
        assert model.cfg.norm_eps == 1e-6 and model.class_names[:2] == ["c0", "c1"]
        with torch.no_grad():
            assert (model(images(224)) - peer(images(224)).logits).abs().max() < 1e-5
