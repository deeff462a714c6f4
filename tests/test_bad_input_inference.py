"""Bad input to `vitkit predict` / `attention` / `inspect` / `convert` / `models` and their Python forms: one line
naming the flag or file and the reason (never a traceback), the other inputs still processed, nothing overwritten
that should not be."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from vitkit.cli import main
from vitkit.data.images import ImageError
from vitkit.inspect import attention_map
from vitkit.models.vit import ViT, ViTConfig

LONG = "x" * 300 + ".jpg"  # longer than any file system allows for one name (255 bytes)


def error_lines(capsys, command: str) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith(f"vitkit {command}: error:")]


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"vitkit {command}: error:") and "\n" not in err, err
    return err


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def ckpt(tmp_path) -> Path:
    torch.manual_seed(0)
    model = ViT(ViTConfig(img_size=32, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64, num_classes=10))
    model.preprocess.update(mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)
    return vitkit.save_model(model, tmp_path / "m.safetensors")


@pytest.fixture()
def photo(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


# --- predict ---------------------------------------------------------------------------------------------
def test_a_name_too_long_is_one_line_and_the_others_are_classified(ckpt, photo, capsys):
    # was: OSError [Errno 36] traceback from Path.exists(), and no image classified at all
    code = main(["predict", str(photo), LONG, str(photo), "--weights", str(ckpt), "--top-k", "1"])
    errors = error_lines(capsys, "predict")
    assert code == 1
    assert errors == [f"vitkit predict: error: {LONG}: cannot read (File name too long)"]


def test_classify_reports_a_name_too_long_through_on_error(ckpt, photo):
    failed = []
    results = list(vitkit.classify(vitkit.load_model(ckpt), [LONG, photo], on_error=failed.append))
    assert [r["path"] for r in results] == [str(photo)]
    assert len(failed) == 1 and isinstance(failed[0], ImageError) and "File name too long" in str(failed[0])


@pytest.mark.parametrize("command", [["predict", "IMG"], ["attention", "IMG", "-o", "OUT"], ["inspect", "-o", "OUT"]])
def test_weights_with_a_name_too_long_is_one_line(ckpt, photo, tmp_path, capsys, command):
    argv = [str(photo) if a == "IMG" else str(tmp_path / "out") if a == "OUT" else a for a in command]
    assert main([*argv, "--weights", str(tmp_path / LONG)]) == 2
    assert "cannot read (File name too long)" in one_line_error(capsys, command[0])


def test_huge_thread_counts_are_refused(ckpt, photo, capsys):
    # was: 100000 OpenMP threads exhausted the address space: ImportError traceback
    assert main(["predict", str(photo), "--weights", str(ckpt), "--threads", "100000"]) == 2
    assert one_line_error(capsys, "predict") == "vitkit predict: error: --threads 100000: must be at most 4096"


def test_a_model_beyond_memory_is_refused_before_allocating(ckpt, photo, capsys, monkeypatch):
    # --img-size 100000 used to be killed by the kernel (exit 137, no message); here memory is made small instead
    monkeypatch.setattr(vitkit.api, "available_memory", lambda: 100_000, raising=False)
    assert main(["predict", str(photo), "--weights", str(ckpt), "--img-size", "256"]) == 2
    err = one_line_error(capsys, "predict")
    assert err.startswith("vitkit predict: error: --img-size 256: img_size 256x256 is too large here"), err


def test_an_image_too_elongated_to_resize_is_refused_and_the_others_classified(ckpt, photo, tmp_path, capsys,
                                                                                monkeypatch):
    # a 400000x1 PNG is 1 KB and under the decompression-bomb limit, but resized for a 224 px model it would be
    # 89,600,000x224 pixels: the process was killed. Scaled down here: a lower limit, a 4000x1 image.
    monkeypatch.setattr("vitkit.data.images.MAX_PIXELS", 100_000)
    line = tmp_path / "line.png"
    Image.new("RGB", (4000, 1)).save(line)
    code = main(["predict", str(line), str(photo), "--weights", str(ckpt), "--top-k", "1"])
    out = capsys.readouterr().out
    assert code == 1 and out.startswith(f"{photo}: ")
    model = vitkit.load_model(ckpt)
    with pytest.raises(ImageError, match="too elongated"):
        list(vitkit.classify(model, line))


def test_a_recursive_glob_through_a_symlink_loop_gives_each_image_once(ckpt, photo, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.open(photo).save(folder / "a.png")
    (folder / "again").symlink_to(folder)  # glob's '**' follows it down to the OS's limit: ~40 copies of a.png
    assert main(["predict", str(folder / "**" / "*.png"), "--weights", str(ckpt), "--top-k", "1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_a_checkpoint_with_nan_weights_is_refused(ckpt, photo, tmp_path, capsys):
    # was: every probability NaN, printed as "nan%" (and as invalid JSON with --json), exit code 0
    model = vitkit.load_model(ckpt)
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    bad = vitkit.save_model(model, tmp_path / "nan.safetensors")
    assert main(["predict", str(photo), "--weights", str(bad), "--json"]) == 2
    assert "holds NaN or infinite values in head.weight" in one_line_error(capsys, "predict")
    assert capsys.readouterr().out == ""


def test_flag_errors_name_the_flag(ckpt, photo, capsys):
    # was: "--weights m.safetensors: img_size 7x7 is not a multiple of the patch size 8"
    assert main(["predict", str(photo), "--weights", str(ckpt), "--img-size", "7"]) == 2
    assert "error: --img-size 7: img_size 7x7 is not a multiple" in one_line_error(capsys, "predict")


def test_unknown_model_names_get_a_suggestion(ckpt, photo, capsys):
    assert main(["predict", str(photo), "--weights", str(ckpt), "--model", "vit_tiny_patch16_22"]) == 2
    assert "did you mean vit_tiny_patch16_224" in one_line_error(capsys, "predict")


# --- attention / inspect -----------------------------------------------------------------------------------
def test_attention_output_that_is_a_file_is_refused_up_front(ckpt, photo, tmp_path, capsys):
    # was: per image "OUT/photo_rollout.png: cannot write (File exists)", after loading the model
    blocker = tmp_path / "maps"
    blocker.write_text("not a folder")
    assert main(["attention", str(photo), "--weights", str(ckpt), "-o", str(blocker)]) == 2
    assert one_line_error(capsys, "attention") == f"vitkit attention: error: -o {blocker}: exists and is not a folder"
    assert main(["attention", str(photo), "--weights", str(ckpt), "-o", str(blocker / "x.png")]) == 2
    assert f"{blocker} is a file, not a folder" in one_line_error(capsys, "attention")


@pytest.mark.parametrize("command", ["attention", "inspect"])
def test_an_empty_output_name_is_refused(ckpt, photo, tmp_path, capsys, monkeypatch, command):
    # was: Path("") is ".": the figures went into the current folder
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(tmp_path))
    argv = ["attention", str(photo)] if command == "attention" else ["inspect", "--images", str(photo)]
    assert main([*argv, "--weights", str(ckpt), "-o", ""]) == 2
    assert "-o '': give a file or folder name" in one_line_error(capsys, command)
    assert sorted(os.listdir(tmp_path)) == before


def test_attention_never_overwrites_an_input_image(ckpt, photo, capsys):
    # was: `vitkit attention photo.png -o photo.png --force` replaced the photo by its attention map
    before = digest(photo)
    assert main(["attention", str(photo), "--weights", str(ckpt), "-o", str(photo), "--force"]) == 1
    assert "is one of the input images; not overwritten" in error_lines(capsys, "attention")[0]
    assert digest(photo) == before


# --- convert / models -----------------------------------------------------------------------------------
def test_convert_into_an_unwritable_place_is_one_line(ckpt, tmp_path, capsys):
    # was: FileExistsError traceback (SafetensorError on a read-only file system), after reading the checkpoint
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["convert", str(ckpt), str(blocker / "out.safetensors")]) == 2
    assert f"{blocker} is a file, not a folder" in one_line_error(capsys, "convert")


def test_save_model_errors_name_the_file(ckpt, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match=f"{blocker / 'm.safetensors'}: cannot write"):
        vitkit.save_model(vitkit.load_model(ckpt), blocker / "m.safetensors")


@pytest.mark.parametrize("names, expected", [
    ("missing.txt", "--class-names {}: cannot read (No such file or directory)"),  # was: "[Errno 2] No such ..."
    (".", "--class-names {}: cannot read (Is a directory)"),  # was: IsADirectoryError traceback
    ("binary.txt", "--class-names {}: not UTF-8 text"),  # was: UnicodeDecodeError traceback
])
def test_convert_class_names_errors_are_one_line(ckpt, tmp_path, capsys, names, expected):
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\xca\x00garbage")
    path = tmp_path / names
    assert main(["convert", str(ckpt), str(tmp_path / "out.safetensors"), "--class-names", str(path)]) == 2
    assert expected.format(path) in one_line_error(capsys, "convert")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("args, expected", [
    (["--num-classes", "-5"], "--num-classes -5: must be 0 (no head) or more"),  # was: blamed on --model
    (["--img-size", "7"], "--img-size 7: img_size 7x7 is not a multiple of the patch size 8"),
])
def test_convert_flag_errors_name_the_flag(ckpt, tmp_path, capsys, args, expected):
    assert main(["convert", str(ckpt), str(tmp_path / "out.safetensors"), *args]) == 2
    assert expected in one_line_error(capsys, "convert")


def test_convert_names_src_not_a_flag_it_does_not_have(tmp_path, capsys):
    src = tmp_path / "timm.pth"
    torch.save({"patch_embed.proj.weight": torch.zeros(4, 3, 2, 2)}, src)
    assert main(["convert", str(src), str(tmp_path / "out.safetensors")]) == 2
    assert one_line_error(capsys, "convert").startswith(f"vitkit convert: error: SRC {src}: not a vitkit checkpoint")


def test_convert_num_classes_beyond_memory_is_one_line(ckpt, tmp_path, capsys):
    # was: RuntimeError traceback from the allocator (76.8 TB)
    assert main(["convert", str(ckpt), str(tmp_path / "out.safetensors"), "--num-classes", "100000000000"]) == 2
    assert "--num-classes 100000000000: num_classes 100,000,000,000 is too large here" in \
        one_line_error(capsys, "convert")


def test_models_filter_matching_nothing_says_so(capsys):
    assert main(["models", "--filter", "zzz"]) == 1
    assert "no model name contains 'zzz'" in capsys.readouterr().err


# --- Python API ---------------------------------------------------------------------------------------------
def test_classify_takes_arrays_as_attention_map_does(ckpt):
    model = vitkit.load_model(ckpt)
    arr = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    assert len(list(vitkit.classify(model, [arr, Image.fromarray(arr)]))) == 2
    with pytest.raises(TypeError, match="not Tensor"):
        list(vitkit.classify(model, [torch.zeros(3, 32, 32)]))


@pytest.mark.parametrize("kwargs", [{"top_k": -1}, {"top_k": 0}, {"batch_size": 0}, {"batch_size": -3}])
def test_classify_checks_its_numbers(ckpt, photo, kwargs):
    # was: top_k=-1 a RuntimeError from topk after the first batch; batch_size=0 one unbounded batch
    with pytest.raises(ValueError, match=f"{next(iter(kwargs))} must be a positive integer"):
        list(vitkit.classify(vitkit.load_model(ckpt), photo, **kwargs))


def test_classify_reports_an_empty_pil_image_and_goes_on(ckpt, photo):
    failed = []
    results = list(vitkit.classify(vitkit.load_model(ckpt), [Image.new("RGB", (0, 0)), photo], on_error=failed.append))
    assert len(results) == 1 and len(failed) == 1 and "empty (0x0 pixels)" in str(failed[0])


def test_create_model_option_errors_say_what_is_wrong():
    with pytest.raises(TypeError, match="unknown model option 'dropuot' \\(did you mean 'dropout'\\?\\)"):
        vitkit.create_model("ViT-Ti/16", dropuot=0.1)
    with pytest.raises(ValueError, match="img_size must be an int or a \\(height, width\\) pair"):
        vitkit.create_model("ViT-Ti/16", img_size=(224, 224, 3))  # was: "224x224 is not a multiple of 16"
    with pytest.raises(ValueError, match="num_classes must be an int, not float"):
        vitkit.create_model("ViT-Ti/16", num_classes=10.5)
    with pytest.raises(TypeError, match="a model name is a str"):
        vitkit.create_model(Path("ViT-Ti/16"))


@pytest.mark.parametrize("image, expected", [
    (torch.zeros(32, 32, 3), "has 32 channels, the model takes 3"),  # was: "input size (32, 3) is not a multiple"
    (torch.zeros(32, 32), "is not an image"),  # was: a conv2d RuntimeError
    (np.zeros((3, 40, 50), np.uint8), "is not an image: give an HxW or HxWx3 uint8 array"),
    (None, "expected a path, PIL image"),  # was: AttributeError 'ndim'
    (Image.new("RGB", (0, 0)), "the image is empty"),
])
def test_attention_map_says_what_input_it_takes(ckpt, image, expected):
    with pytest.raises((TypeError, ValueError), match=expected):
        attention_map(vitkit.load_model(ckpt), image)


def test_classify_takes_an_array_of_paths_as_a_list(ckpt, photo):
    """A column of file names (pandas' .values) is many paths, not one image."""
    model = vitkit.load_model(ckpt)
    results = list(vitkit.classify(model, np.array([str(photo), str(photo)])))
    assert [r["path"] for r in results] == [str(photo)] * 2


def test_the_failure_count_tells_empty_inputs_from_failed_images(ckpt, photo, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    args = ["--weights", str(ckpt), "--top-k", "1"]
    assert main(["predict", str(photo), str(tmp_path / "empty"), *args]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == "vitkit predict: 1 input named no images"
    assert main(["predict", str(photo), str(bad), str(tmp_path / "empty"), str(tmp_path / "*.gif"), *args]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == "vitkit predict: 1 of 2 images failed; 2 inputs named no images"


def test_predict_reads_an_image_piped_to_standard_input(ckpt, photo):
    from train_utils import ROOT, env

    def predict(*paths, **stdin):
        done = subprocess.run([sys.executable, "-m", "vitkit", "predict", "--weights", str(ckpt), "--json", *paths],
                              capture_output=True, cwd=ROOT, env=env(), timeout=120, **stdin)
        return done.returncode, [json.loads(line) for line in done.stdout.splitlines()], done.stderr.decode()

    code, [expected], _ = predict(str(photo))
    code_piped, [got], err = predict("-", input=photo.read_bytes())
    assert code == code_piped == 0, err
    assert got["path"] == "-" and got["top_k"] == expected["top_k"]
    # nothing piped, or "-" twice (the first one read it): one line, the other inputs classified
    code, results, err = predict("-", str(photo), stdin=subprocess.DEVNULL)
    assert code == 1 and [r.get("top_k") for r in results] == [None, expected["top_k"]]
    assert results[0] == {"path": "-", "input": 0, "error": "-: no image on standard input"}
    assert "vitkit predict: error: -: no image on standard input" in err.splitlines(), err
    code, results, err = predict("-", "-", input=photo.read_bytes())
    assert code == 1 and ["top_k" in r for r in results] == [True, False], err
    assert "-: no image on standard input" in err, err

    # attention takes it too, named stdin_<method>.png (not a file name that starts like an option)
    maps = photo.parent / "maps"
    done = subprocess.run([sys.executable, "-m", "vitkit", "attention", "-", "--weights", str(ckpt), "-o", str(maps)],
                          input=photo.read_bytes(), capture_output=True, cwd=ROOT, env=env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in maps.iterdir()] == ["stdin_rollout.png"]
    assert Image.open(maps / "stdin_rollout.png").size[0] > 100


def test_capture_attention_takes_one_index_or_a_list(ckpt):
    model = vitkit.load_model(ckpt)
    x = torch.randn(1, 3, 32, 32)
    with vitkit.capture_attention(model, -1) as one, torch.no_grad():
        model(x)
    with vitkit.capture_attention(model, [1]) as listed, torch.no_grad():
        model(x)
    assert list(one) == list(listed) == [1] and torch.equal(one[1], listed[1])
    for same in (torch.tensor(-1), np.int64(1), torch.tensor([0, 1])[1:], [np.int32(-1)]):  # integers from libraries
        with vitkit.capture_attention(model, same) as got, torch.no_grad():
            model(x)
        assert list(got) == [1] and torch.equal(got[1], one[1])
    for bad in ("1", 1.0, [0, "1"], True, torch.tensor(1.0), torch.tensor(True), [torch.tensor(0.5)]):
        with pytest.raises(TypeError, match="layers: a block index or a list of them"):
            with vitkit.capture_attention(model, bad):
                pass
    with pytest.raises(IndexError, match="layer index 2 out of range: the model has 2 blocks"):
        with vitkit.capture_attention(model, 2):
            pass


def test_figures_replace_earlier_files_only_once_complete(tmp_path, monkeypatch):
    """A failure while drawing (a full disk, say) keeps the earlier picture whole and leaves no temporary file."""
    from matplotlib.figure import Figure

    from vitkit.inspect.figure7 import save_figure

    target = tmp_path / "filters.png"
    fig = Figure()
    fig.subplots().plot([0, 1])
    save_figure(fig, target)
    first = target.read_bytes()
    assert first.startswith(b"\x89PNG")

    def full_disk(path, **kwargs):
        Path(path).write_bytes(b"half a picture")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fig, "savefig", full_disk)
    with pytest.raises(OSError):
        save_figure(fig, target)
    assert target.read_bytes() == first and os.listdir(tmp_path) == ["filters.png"]


def test_convert_onto_its_own_source_needs_force(ckpt, capsys):
    before = digest(ckpt)
    assert main(["convert", str(ckpt), str(ckpt), "--img-size", "48"]) == 2
    assert "already exists (use --force to overwrite)" in one_line_error(capsys, "convert") and digest(ckpt) == before
    assert main(["convert", str(ckpt), str(ckpt), "--img-size", "48", "--force"]) == 0
    assert vitkit.load_model(ckpt).cfg.img_size == (48, 48)


def _with_metadata(src: Path, dst: Path, meta) -> Path:
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(src)), str(dst), metadata={"vitkit": "1", "config": json.dumps(meta)})
    return dst


@pytest.mark.parametrize("change, expected", [
    (lambda m: m.pop("config"), "no config object in its metadata"),
    (lambda m: m.update(config=[1, 2]), "no config object in its metadata"),
    (lambda m: m["preprocess"].update(interpolation="lanczos"), "an unusable preprocess interpolation must be one of"),
    (lambda m: m["preprocess"].update(mean=[0.5]), "an unusable preprocess mean must be a list of 3"),
    (lambda m: m["config"].update(depth="two"), "an unusable config (depth must be an int, not str 'two')"),
    (lambda m: m["config"].update(colour="red"), "an unusable config (unknown ViT config fields: ['colour'])"),
    (lambda m: m.update(class_names="abc"), "class_names that are not a list of strings"),
    (lambda m: m.update(pos_resample={"mode": "lanczos"}), "pos_resample {'mode': 'lanczos'} that vitkit cannot"),
])
def test_a_vitkit_checkpoint_with_bad_metadata_is_one_line(ckpt, photo, tmp_path, capsys, change, expected):
    from vitkit.weights.vitkit_format import read_metadata

    meta = read_metadata(ckpt)
    change(meta)
    bad = _with_metadata(ckpt, tmp_path / "bad.safetensors", meta)
    assert main(["predict", str(photo), "--weights", str(bad)]) == 2
    err = one_line_error(capsys, "predict")
    assert f"{bad}: vitkit checkpoint with {expected}" in err, err
    _with_metadata(ckpt, bad, [meta])  # metadata that is not an object at all
    assert main(["predict", str(photo), "--weights", str(bad)]) == 2
    assert "no config object in its metadata" in one_line_error(capsys, "predict")


@pytest.mark.parametrize("config, preprocessor, expected", [
    ([1, 2], None, "a JSON list, not a transformers config object"),
    ({"model_type": "vit"}, None, "num_attention_heads None is not a positive number"),
    ({"model_type": "vit", "num_attention_heads": 2, "image_size": "big"}, None, "image_size 'big' is not a positive"),
    ({"model_type": "vit", "num_attention_heads": 2}, {"size": "large"}, "unreadable (size 'large' is neither"),
    ({"model_type": "vit", "num_attention_heads": 2}, {"resample": 7}, "resample 7 is not one of PIL's resampling"),
    ({"model_type": "vit", "num_attention_heads": 2}, {"image_mean": [0.5]}, "image_mean/image_std [0.5]: not three"),
])
def test_a_transformers_folder_with_bad_json_is_one_line(ckpt, photo, tmp_path, capsys, config, preprocessor,
                                                         expected):
    from safetensors.torch import save_file

    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({"vit.embeddings.patch_embeddings.projection.weight": torch.zeros(32, 3, 8, 8)},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    assert main(["predict", str(photo), "--weights", str(folder), "--model", "ViT-Ti/8"]) == 2
    assert expected in one_line_error(capsys, "predict")


def test_predict_skips_hidden_files_and_macos_debris_in_folders(ckpt, photo, tmp_path, capsys):
    folder = tmp_path / "photos"
    (folder / "__MACOSX").mkdir(parents=True)
    (folder / "a.png").write_bytes(photo.read_bytes())
    for junk in ("._a.png", ".hidden.png", "__MACOSX/._a.png"):
        (folder / junk).write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    assert main(["predict", str(folder), "--weights", str(ckpt), "--json"]) == 0
    assert [json.loads(line)["path"] for line in capsys.readouterr().out.splitlines()] == [str(folder / "a.png")]


def test_a_tiff_whose_decoder_raises_something_else_is_one_line(ckpt, photo, tmp_path, capsys):
    """A TIFF whose next-page offset points past its end: PIL raises TypeError ("Missing dimensions")."""
    import io
    import struct

    buf = io.BytesIO()
    Image.new("RGB", (24, 24)).save(buf, "TIFF")
    data = bytearray(buf.getvalue())
    ifd = struct.unpack("<I", data[4:8])[0]
    end = ifd + 2 + 12 * struct.unpack("<H", data[ifd:ifd + 2])[0]
    data[end:end + 4] = struct.pack("<I", len(data) + 1000)
    (tmp_path / "scan.tif").write_bytes(bytes(data))
    assert main(["predict", str(tmp_path / "scan.tif"), str(photo), "--weights", str(ckpt)]) == 1
    assert error_lines(capsys, "predict")[0].endswith("scan.tif: corrupt or truncated image (TypeError: Missing "
                                                       "dimensions)")


def test_quiet_goes_before_or_after_the_command(capsys):
    for args in (["-q", "models", "--filter", "tiny"], ["models", "--filter", "tiny", "-q"]):
        assert main(args) == 0
        assert "vit_tiny_patch16_224" in capsys.readouterr().out
