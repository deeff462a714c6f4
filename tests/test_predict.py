"""`vitkit predict` / `vitkit.classify`: numbers, preprocessing parity, and every kind of bad input."""
import json
import logging
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from vitkit.cli import main as vitkit_main
from vitkit.data.images import ImageError, eval_transform, load_image

from image_utils import photo

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-samples"
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason="../shared/data/imagenet-samples not present")


def vitkit_cli(*args):
    return subprocess.run([sys.executable, "-m", "vitkit", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A small 10-class vitkit checkpoint with its own class names."""
    torch.manual_seed(0)
    model = vitkit.create_model("ViT-Ti/16", img_size=64, depth=2, num_classes=10)
    model.class_names = [f"class-{i}" for i in range(10)]
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    vitkit.save_model(model, path)
    return path, model


def png_with_size(path: Path, width: int, height: int):
    """A tiny valid PNG whose header claims width x height (a decompression bomb as PIL sees it)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0\0")) +
                     chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def image_zoo(tmp_path_factory):
    """(good images that must be classified, bad ones that must fail) written in every awkward form."""
    d = tmp_path_factory.mktemp("zoo")
    rgb = Image.fromarray(photo())
    good = {
        "rgb.jpg": lambda p: rgb.save(p),
        "gray.png": lambda p: rgb.convert("L").save(p),
        "cmyk.jpg": lambda p: rgb.convert("CMYK").save(p),
        "rgba.png": lambda p: rgb.convert("RGBA").save(p),
        "palette.png": lambda p: rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(p),
        "sixteen.png": lambda p: Image.fromarray(photo()[..., 0].astype(np.uint16) * 257).save(p),
        "animated.gif": lambda p: rgb.save(p, save_all=True, append_images=[rgb.rotate(90)], duration=50),
    }
    for name, write in good.items():
        write(d / name)
    full = (d / "rgb.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 40)
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.jpg").write_text("this is not an image\n")
    png_with_size(d / "bomb.png", 40000, 40000)
    bad = ["truncated.jpg", "corrupt.png", "empty.jpg", "notes.jpg", "bomb.png", "missing.jpg"]
    return d, [d / n for n in good], [d / n for n in bad]


def test_classify_matches_direct_forward(tiny_ckpt, image_zoo):
    path, model = tiny_ckpt
    good = image_zoo[1]
    results = list(vitkit.classify(vitkit.load_model(path), good, top_k=3, batch_size=4))
    assert [r["path"] for r in results] == [str(p) for p in good]
    transform = eval_transform(model.preprocess, model.cfg.img_size)
    for r, p in zip(results, good):
        with torch.no_grad():
            probs = model(transform(load_image(p)[0])[None]).softmax(-1)[0]
        top = probs.topk(3)
        assert [t["index"] for t in r["top_k"]] == top.indices.tolist()
        assert [t["label"] for t in r["top_k"]] == [f"class-{i}" for i in top.indices.tolist()]
        np.testing.assert_allclose([t["prob"] for t in r["top_k"]], top.values.numpy(), atol=1e-6)


def test_classify_in_the_models_precision(tiny_ckpt, image_zoo):
    """A model cast to bf16 (or .half() on a GPU) gets its inputs in that precision too."""
    path, model = tiny_ckpt
    good = image_zoo[1][:2]
    full = list(vitkit.classify(vitkit.load_model(path), good, top_k=1))
    half = list(vitkit.classify(vitkit.load_model(path).to(torch.bfloat16), good, top_k=1))
    assert [r["top_k"][0]["index"] for r in half] == [r["top_k"][0]["index"] for r in full]
    np.testing.assert_allclose([r["top_k"][0]["prob"] for r in half], [r["top_k"][0]["prob"] for r in full],
                               atol=0.05)


def test_cli_device(tiny_ckpt, image_zoo):
    path, _ = tiny_ckpt
    r = vitkit_cli("predict", image_zoo[1][0], "--weights", path, "--device", "cpu", "--json")
    assert r.returncode == 0 and json.loads(r.stdout.splitlines()[0])["top_k"], r.stderr


def test_classify_flip_tta(tiny_ckpt, image_zoo):
    path, model = tiny_ckpt
    good = image_zoo[1][:3]
    results = list(vitkit.classify(vitkit.load_model(path), good, top_k=2, tta="flip"))
    transform = eval_transform(model.preprocess, model.cfg.img_size)
    x = torch.stack([transform(load_image(p)[0]) for p in good])
    with torch.no_grad():
        probs = ((model(x) + model(x.flip(-1))) / 2).softmax(-1)
    top = probs.topk(2)
    assert [[t["index"] for t in r["top_k"]] for r in results] == top.indices.tolist()
    np.testing.assert_allclose([[t["prob"] for t in r["top_k"]] for r in results], top.values.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="tta='rotate'"):
        next(vitkit.classify(model, good, tta="rotate"))


def test_conversions_keep_the_picture(image_zoo):
    d, _, _ = image_zoo
    ref = np.asarray(load_image(d / "rgb.jpg")[0], dtype=float)
    gray, note = load_image(d / "gray.png")
    assert gray.mode == "RGB" and note is None
    sixteen, note = load_image(d / "sixteen.png")  # 16-bit values scaled down, not clipped to white
    assert "16" in note
    np.testing.assert_array_equal(np.asarray(sixteen)[..., 0], photo()[..., 0])
    cmyk = np.asarray(load_image(d / "cmyk.jpg")[0], dtype=float)
    assert np.abs(cmyk - ref).mean() < 8  # JPEG + CMYK round trip, same picture
    first, note = load_image(d / "animated.gif")
    assert "first" in note and first.size == (80, 60)


def test_cli_bad_inputs_reported_and_others_classified(tiny_ckpt, image_zoo):
    path, _ = tiny_ckpt
    d, good, bad = image_zoo
    r = vitkit_cli("predict", *good, *bad, "--weights", path, "--json", "--top-k", "2")
    assert r.returncode == 1
    records = [json.loads(line) for line in r.stdout.splitlines()]  # one per input, in input order
    assert [line["path"] for line in records] == [str(p) for p in [*good, *bad]]
    assert [line["input"] for line in records] == list(range(len(good) + len(bad)))
    lines = records[:len(good)]
    assert all(len(line["top_k"]) == 2 for line in lines)
    assert [line["error"].split(":")[0] for line in records[len(good):]] == [str(p) for p in bad]
    errors = [line for line in r.stderr.splitlines() if ": error: " in line]
    assert len(errors) == len(bad), r.stderr
    reasons = {"truncated.jpg": "truncated", "corrupt.png": "corrupt", "empty.jpg": "empty",
               "notes.jpg": "not an image", "bomb.png": "too large", "missing.jpg": "no such file"}
    for p in bad:
        line = next(e for e in errors if str(p) in e)
        assert reasons[p.name] in line, line
    assert "Traceback" not in r.stderr


def test_cli_walks_folders_and_prints_text(tiny_ckpt, image_zoo, tmp_path):
    path, _ = tiny_ckpt
    for i in range(3):
        sub = tmp_path / f"sub{i}"
        sub.mkdir()
        Image.fromarray(photo(i)).save(sub / f"{i}.png")
    (tmp_path / "readme.txt").write_text("skipped: not an image suffix")
    r = vitkit_cli("predict", tmp_path, "--weights", path, "--top-k", "1")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 3 and all("class-" in line for line in r.stdout.splitlines())


@pytest.mark.parametrize("args, message", [
    (["--weights", "nope.safetensors"], "no such file"),
    (["--top-k", "0"], "--top-k"),
    (["--threads", "-1"], "--threads -1: must be at least 1"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device 'cuda:"),
    (["--device", "gpu0"], "--device 'gpu0' is not a device name"),
])
def test_cli_argument_errors_are_one_line(tiny_ckpt, image_zoo, args, message):
    path, _ = tiny_ckpt
    extra = [] if "--weights" in args else ["--weights", path]
    r = vitkit_cli("predict", image_zoo[1][0], *args, *extra)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_empty_folder_is_reported_and_the_others_classified(tiny_ckpt, image_zoo, tmp_path):
    path, _ = tiny_ckpt
    (tmp_path / "empty").mkdir()
    r = vitkit_cli("predict", image_zoo[1][0], tmp_path / "empty", "--weights", path, "--top-k", "1")
    assert r.returncode == 1 and r.stdout.startswith(f"{image_zoo[1][0]}: class-")
    assert f"error: {tmp_path / 'empty'}: no images found in this folder" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_expands_quoted_glob_patterns(tiny_ckpt, tmp_path):
    path, _ = tiny_ckpt
    for name in ("b.png", "a.png", "c.jpg"):
        Image.fromarray(photo()).save(tmp_path / name)
    r = vitkit_cli("predict", tmp_path / "*.png", tmp_path / "nothing-*.jpg", "--weights", path, "--json")
    assert r.returncode == 1
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(r["path"], r["input"], "top_k" in r) for r in records] == [  # expanded, sorted; c.jpg not matched
        (str(tmp_path / "a.png"), 0, True), (str(tmp_path / "b.png"), 0, True),
        (str(tmp_path / "nothing-*.jpg"), 1, False)]
    errors = [line for line in r.stderr.splitlines() if ": error: " in line]
    assert errors == [f"vitkit predict: error: {tmp_path / 'nothing-*.jpg'}: no files match this pattern"]


def test_model_without_head_is_refused_before_any_work(tmp_path, image_zoo):
    model = vitkit.ViT(vitkit.ViTConfig(img_size=32, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64,
                                        num_classes=0))
    vitkit.save_model(model, tmp_path / "backbone.safetensors")
    r = vitkit_cli("predict", *image_zoo[1], "--weights", tmp_path / "backbone.safetensors")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        f"vitkit predict: error: --weights {tmp_path / 'backbone.safetensors'}: the model has no classifier head "
        "(num_classes=0)"]
    with pytest.raises(ValueError, match="no classifier head"):
        next(vitkit.classify(model, image_zoo[1]))


def test_classify_converts_pil_images_like_files(tiny_ckpt, image_zoo, tmp_path, caplog, capsys):
    _, model = tiny_ckpt
    sixteen = image_zoo[0] / "sixteen.png"  # PIL's own convert("RGB") clips 16-bit values: all white
    rgba = np.dstack([photo(1), np.where(np.arange(80) < 40, 0, 255).astype(np.uint8)[None].repeat(60, 0)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "half-transparent.png")  # composited on white, not dropped
    files = [sixteen, tmp_path / "half-transparent.png"]
    caplog.set_level(logging.INFO, logger="vitkit")
    from_pil = list(vitkit.classify(model, [Image.open(f) for f in files], top_k=10))
    assert "images[0] (PngImageFile): I;16 image scaled to 8 bits" in caplog.text
    assert "vitkit predict" not in capsys.readouterr().err  # API notes go to the logger only
    from_files = list(vitkit.classify(model, files, top_k=10))
    for a, b in zip(from_pil, from_files):
        assert [t["index"] for t in a["top_k"]] == [t["index"] for t in b["top_k"]]
        np.testing.assert_allclose([t["prob"] for t in a["top_k"]], [t["prob"] for t in b["top_k"]], atol=1e-6)


def test_quiet_silences_conversion_notes(tiny_ckpt, image_zoo):
    path, _ = tiny_ckpt
    d = image_zoo[0]
    inputs = [d / "sixteen.png", d / "animated.gif"]
    r = vitkit_cli("predict", *inputs, "--weights", path)
    assert r.returncode == 0 and "I;16 image scaled to 8 bits" in r.stderr and "animated image" in r.stderr
    r = vitkit_cli("-q", "predict", *inputs, "--weights", path)
    assert r.returncode == 0 and r.stderr == "" and len(r.stdout.splitlines()) == 2


def test_float_images_are_scaled_by_their_range(tmp_path):
    ramp = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(48, 64)
    cases = {"unit.tif": (ramp, ramp * 255),                     # values in [0, 1]: the usual float range
             "bytes.tif": (ramp * 200, ramp * 200),               # within 0..255: taken as 8-bit values
             "signed.tif": (ramp * 10 - 5, ramp * 255)}           # no standard range: min..max stretched
    for name, (values, want) in cases.items():
        Image.fromarray(values, "F").save(tmp_path / name)
        img, note = load_image(tmp_path / name)
        assert note == "F image scaled to 8 bits"
        np.testing.assert_allclose(np.asarray(img)[..., 0], want, atol=1, err_msg=name)


def test_non_vitkit_weights_need_model(tmp_path, image_zoo):
    model = vitkit.create_model("ViT-Ti/16", depth=1)
    torch.save(model.state_dict(), tmp_path / "timm.pth")
    r = vitkit_cli("predict", image_zoo[1][0], "--weights", tmp_path / "timm.pth")
    assert r.returncode == 2 and "--model" in r.stderr
    (tmp_path / "empty").mkdir()  # a folder is read for its config.json: without one, that is what is said
    r = vitkit_cli("predict", image_zoo[1][0], "--weights", tmp_path / "empty")
    assert r.returncode == 2 and f"{tmp_path / 'empty'}: a folder without config.json, so not a checkpoint" in r.stderr
    # a hub repository may say its architecture (a transformers one does): fetched first (offline here)
    r = subprocess.run([sys.executable, "-m", "vitkit", "predict", str(image_zoo[1][0]), "--weights",
                        "hf-hub:google/vit-base-patch16-224"], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("vitkit predict: error: hf-hub:google/vit-base-patch16-224: download failed")


def test_imagenet_labels_and_real_photos(tmp_path):
    """A 1000-class model without its own names gets torchvision's ImageNet names."""
    model = vitkit.create_model("ViT-Ti/16", depth=1)
    vitkit.save_model(model, tmp_path / "in1k.safetensors")
    photos = sorted(SAMPLES.glob("*.JPEG"))[:6] if SAMPLES.is_dir() else []
    if not photos:
        pytest.skip("../shared/data/imagenet-samples not present")
    r = vitkit_cli("predict", *photos, "--weights", tmp_path / "in1k.safetensors", "--json", "--top-k", "1")
    assert r.returncode == 0, r.stderr
    from torchvision.models import ViT_B_16_Weights
    names = ViT_B_16_Weights.IMAGENET1K_V1.meta["categories"]
    for line in map(json.loads, r.stdout.splitlines()):
        top = line["top_k"][0]
        assert top["label"] == names[top["index"]]


@needs_samples
def test_all_shared_samples_load_as_rgb():
    for p in sorted(SAMPLES.glob("*.JPEG")):
        img, _ = load_image(p)
        assert img.mode == "RGB" and min(img.size) > 16


def test_preprocessing_matches_timm_and_torchvision():
    timm = pytest.importorskip("timm")
    from timm.data import create_transform, resolve_data_config
    from torchvision.models import ViT_B_16_Weights

    img = Image.fromarray(photo(3, (300, 200)))
    ours = vitkit.create_model("vit_base_patch16_224", depth=1)
    ref = create_transform(**resolve_data_config({}, model=timm.create_model("vit_base_patch16_224", depth=1)))
    assert (ref(img) - eval_transform(ours.preprocess, ours.cfg.img_size)(img)).abs().max() < 1e-5
    ours = vitkit.create_model("vit_b_16", depth=1)
    ref = ViT_B_16_Weights.IMAGENET1K_V1.transforms()
    assert (ref(img) - eval_transform(ours.preprocess, ours.cfg.img_size)(img)).abs().max() < 1e-5


def test_image_error_is_value_error():
    with pytest.raises(ImageError, match="no such file"):
        load_image("/definitely/not/here.png")


# --- output, conversions and shapes in detail -------------------------------------------------------------
def test_text_output_lists_labels_with_percentages(tiny_ckpt, tmp_path, capsys):
    path, model = tiny_ckpt
    img = tmp_path / "a.png"
    Image.fromarray(photo(1)).save(img)
    assert vitkit_main(["predict", str(img), "--weights", str(path), "--top-k", "3"]) == 0
    want = next(vitkit.classify(vitkit.load_model(path), [img], top_k=3))
    tops = ", ".join(f"{t['label']} ({t['prob']:.1%})" for t in want["top_k"])
    assert capsys.readouterr().out == f"{img}: {tops}\n"


def test_top_k_beyond_the_number_of_classes_lists_every_class(tiny_ckpt, tmp_path, capsys):
    path, _ = tiny_ckpt
    img = tmp_path / "a.png"
    Image.fromarray(photo(2)).save(img)
    assert vitkit_main(["predict", str(img), "--weights", str(path), "--top-k", "20", "--json"]) == 0
    top = json.loads(capsys.readouterr().out)["top_k"]
    assert sorted(t["index"] for t in top) == list(range(10))
    assert sum(t["prob"] for t in top) == pytest.approx(1, abs=1e-5)


def test_failure_count_counts_all_inputs(tiny_ckpt, tmp_path, capsys):
    path, _ = tiny_ckpt
    good, bad = tmp_path / "good.png", tmp_path / "bad.jpg"
    Image.fromarray(photo(3)).save(good)
    bad.write_text("not an image")
    assert vitkit_main(["predict", str(good), str(bad), "--weights", str(path)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == "vitkit predict: 1 of 2 images failed"


def test_transparent_pixels_become_white_and_opaque_ones_stay(tmp_path):
    rgb = photo(4)
    alpha = np.where(np.arange(80) < 40, 0, 255).astype(np.uint8)[None].repeat(60, 0)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "half.png")
    out = np.asarray(load_image(tmp_path / "half.png")[0])
    assert (out[:, :40] == 255).all()  # transparent half: white
    np.testing.assert_array_equal(out[:, 40:], rgb[:, 40:])  # opaque half: untouched
    la = Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA")  # grey + alpha as well
    la.save(tmp_path / "la.png")
    assert (np.asarray(load_image(tmp_path / "la.png")[0])[:, :40] == 255).all()


def test_palette_transparency_is_composited_on_white(tmp_path):
    idx = np.zeros((20, 30), dtype=np.uint8)
    idx[:, 15:] = 1
    img = Image.fromarray(idx, "P")
    img.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    img.info["transparency"] = 0
    img.save(tmp_path / "p.png", transparency=0)
    out = np.asarray(load_image(tmp_path / "p.png")[0])
    assert (out[:, :15] == 255).all()
    assert (out[:, 15:] == [200, 30, 30]).all()


def test_sixteen_bit_values_in_mode_I_are_scaled_by_the_16_bit_range(tmp_path):
    dark = (photo(5)[..., 0].astype(np.int32) // 2) * 257  # values 0..127 in 16-bit units
    Image.fromarray(dark).save(tmp_path / "i32.tif")
    img, note = load_image(tmp_path / "i32.tif")
    assert note == "I image scaled to 8 bits"
    np.testing.assert_array_equal(np.asarray(img)[..., 0], photo(5)[..., 0] // 2)


def test_high_depth_values_are_rounded_to_the_nearest_8_bit_level(tmp_path):
    levels = np.arange(255, dtype=np.float32)
    values = np.concatenate([(levels + 0.6) / 255, [0.0, 1.0]]).astype(np.float32)[None]  # 0 and 1: range [0, 1]
    Image.fromarray(values, "F").save(tmp_path / "f.tif")
    out = np.asarray(load_image(tmp_path / "f.tif")[0])[0, :, 0]
    np.testing.assert_array_equal(out[:255], levels + 1)
    sixteen = (np.arange(255, dtype=np.uint16) * 257 + 128)[None]  # k + 0.498 in 8-bit units: rounds down to k
    Image.fromarray(sixteen).save(tmp_path / "s.png")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "s.png")[0])[0, :, 0], np.arange(255))


def test_classify_with_a_non_square_model_matches_a_direct_forward(tmp_path):
    from vitkit.data.images import eval_transform

    torch.manual_seed(0)
    model = vitkit.ViT(vitkit.ViTConfig(patch_size=8, img_size=(32, 48), width=32, depth=2, num_heads=2, mlp_dim=64,
                                        num_classes=5)).eval()
    img = tmp_path / "a.png"
    Image.fromarray(photo(11, (90, 50))).save(img)
    x = eval_transform(model.preprocess, model.cfg.img_size)(load_image(img)[0])
    assert x.shape == (3, 32, 48)
    with torch.no_grad():
        probs = model(x[None]).softmax(-1)[0]
    got = next(vitkit.classify(model, [img], top_k=5))["top_k"]
    np.testing.assert_allclose([t["prob"] for t in got], probs.sort(descending=True).values.numpy(), atol=1e-6)


def test_classify_runs_a_training_model_in_eval_mode_and_leaves_it_as_it_was(tmp_path):
    """A model mid-fine-tuning: dropout off and BatchNorm's running statistics used, not updated (the zoo model's
    conv stem has BatchNorm: in train mode one call changed them for good)."""
    model = vitkit.load_model(Path(__file__).resolve().parents[1] / "zoo" / "cifar10-vit.safetensors")
    model.cfg.dropout = 0.0
    Image.fromarray(photo(5, (48, 40))).save(tmp_path / "a.png")
    expected = list(vitkit.classify(model, tmp_path / "a.png"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model.patch_embed.eval()  # a mixed mode, as a frozen stem would be
    assert list(vitkit.classify(model, tmp_path / "a.png")) == expected
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and model.blocks[0].training and not model.patch_embed.training


def test_exif_orientation_is_applied_once(tmp_path):
    """A phone photo stores its pixels sideways with an EXIF orientation: read upright, as transformers does (all
    eight orientations; 2, a mirror, was missed once), and not turned again when the upright image is converted
    once more (attention maps did that)."""
    from PIL import ImageOps

    from vitkit.data.images import _to_rgb

    stored = Image.fromarray(photo(6, (60, 80)))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        stored.save(tmp_path / f"o{orientation}.jpg", exif=exif.tobytes(), quality=95)
        img, _ = load_image(tmp_path / f"o{orientation}.jpg")
        expected = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / f"o{orientation}.jpg")).convert("RGB"))
        np.testing.assert_array_equal(np.asarray(img), expected, err_msg=f"orientation {orientation}")
        np.testing.assert_array_equal(np.asarray(_to_rgb(img)[0]), expected, err_msg=f"twice, {orientation}")


def test_a_closed_pil_image_is_an_image_error(tiny_ckpt, tmp_path):
    _, model = tiny_ckpt
    Image.fromarray(photo()).save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as im:
        pass
    with pytest.raises(ImageError, match=r"images\[0\] \(PngImageFile\): its pixels cannot be read .*load\(\)"):
        list(vitkit.classify(model, im))


def test_urls_are_downloaded_and_failures_are_one_line(tiny_ckpt, tmp_path, http_root):
    root, base, _ = http_root
    path, model = tiny_ckpt
    Image.fromarray(photo(7)).save(root / "cat.png")
    url = f"{base}/cat.png"
    errors = []
    got = list(vitkit.classify(model, [url, url.replace("cat", "dog"), "ftp://x/y.png"], on_error=errors.append))
    assert [(r["path"], r["input"]) for r in got] == [(url, 0)]
    assert got[0]["top_k"] == next(iter(vitkit.classify(model, root / "cat.png")))["top_k"]
    assert [str(e) for e in errors] == [f"{url.replace('cat', 'dog')}: download failed (HTTP 404 File not found)",
                                        "ftp://x/y.png: only http(s) URLs are downloaded"]
    r = vitkit_cli("predict", url, "--weights", path, "--top-k", "1")  # the URL printed as given
    assert r.returncode == 0 and r.stdout.startswith(f"{url}: "), r.stderr
    maps = tmp_path / "maps"  # attention takes it too, named by the URL's file name
    assert vitkit_main(["attention", url + "?size=2", "--weights", str(path), "-o", str(maps)]) == 0
    assert [p.name for p in maps.iterdir()] == ["cat_rollout.png"]


def test_folders_are_walked_through_symlinks_for_every_format_pil_reads(tmp_path):
    from vitkit.data.images import iter_image_paths

    (tmp_path / "elsewhere").mkdir()
    for name in ("a.jfif", "b.qoi", "c.pnm"):
        Image.fromarray(photo()).save(tmp_path / "elsewhere" / name, format={"jfif": "JPEG"}.get(name[-4:]))
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "linked").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "photos" / "loop").symlink_to(tmp_path / "photos")  # walked once, not forever
    (tmp_path / "photos" / "notes.pdf").write_text("not walked")
    found = list(iter_image_paths([tmp_path / "photos"]))
    assert [p.relative_to(tmp_path / "photos").as_posix() for p in found] == \
        ["linked/a.jfif", "linked/b.qoi", "linked/c.pnm"]
    assert all(load_image(p)[0].size == (80, 60) for p in found)


def test_images_in_memory_are_told_apart_by_position(tiny_ckpt):
    _, model = tiny_ckpt
    errors = []
    got = list(vitkit.classify(model, [Image.fromarray(photo()), Image.new("RGB", (0, 5)), photo(),
                                       photo().astype(np.float32) + 3, photo(), ""], on_error=errors.append))
    assert [(r["path"], r["input"]) for r in got] == [(None, 0), (None, 2), (None, 4)]
    assert [(str(e).split(": ")[0], e.input) for e in errors] == [("images[1] (Image)", 1), ("images[3]", 3),
                                                                   ('""', 5)]
    with pytest.raises(TypeError, match="on_error must be a function"):
        vitkit.classify(model, photo(), on_error=5)


def test_image_arrays_of_other_dtypes_are_scaled(tiny_ckpt):
    _, model = tiny_ckpt
    pixels = photo()

    def top(image):
        return next(iter(vitkit.classify(model, image, top_k=3)))["top_k"]

    expected = top(pixels)
    assert top(pixels / 255.0) == expected  # floats in [0, 1]
    assert top(pixels.astype(np.uint16) * 257) == expected  # 16 bits
    assert top(pixels.astype(np.int64)) == expected  # ints within 0-255
    with pytest.raises(ValueError, match=r"images\[0\]: a float64 array .* floats in \[0, 1\] \(these are 0.0 to 2"):
        top(pixels.astype(float))
    with pytest.raises(ValueError, match=r"looks like \(C, H, W\): a.transpose\(1, 2, 0\)"):
        top(pixels.transpose(2, 0, 1).copy())


def test_classify_checks_its_arguments_at_the_call(tiny_ckpt):
    _, model = tiny_ckpt
    for kwargs, message in [({"top_k": 0}, "top_k must be a positive integer"),
                            ({"tta": "flips"}, "tta='flips': expected one of none, flip")]:
        with pytest.raises(ValueError, match=message):
            vitkit.classify(model, "missing.png", **kwargs)  # not only once the results are read


def test_a_download_that_drips_stops_at_its_deadline():
    import http.server
    import threading
    import time

    from vitkit.data.images import _download

    class Drip(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            for _ in range(40):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        start = time.monotonic()
        with pytest.raises(ImageError, match=r"drip: download failed \(not done after 1 s\)"):
            _download(f"http://127.0.0.1:{server.server_port}/drip", timeout=5, deadline=1)
        assert time.monotonic() - start < 3
    finally:
        server.shutdown()
