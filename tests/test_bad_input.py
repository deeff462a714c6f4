"""Bad input to `vitkit train` / `vitkit eval` (and their Python forms): one line naming the flag or file and the
reason, exit code 2, before any work, no run directory made and no result lost."""
from __future__ import annotations

import pathlib
import re
from pathlib import Path

import pytest

import vitkit
from vitkit.cli import main
from vitkit.data.datasets import DataError
from vitkit.models.vit import ViT, ViTConfig
from vitkit.train.recipe import RecipeError

from train_utils import write_recipe


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"vitkit {command}: error:") and "\n" not in err, err
    return err


@pytest.fixture()
def checkpoint(tmp_path) -> Path:
    """A 1-block ViT for 8x8 digits, untrained: enough to evaluate."""
    model = ViT(ViTConfig(img_size=8, patch_size=2, width=16, depth=1, num_heads=2, mlp_dim=32, num_classes=10))
    model.class_names = [str(i) for i in range(10)]
    model.preprocess.update(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0)
    return vitkit.save_model(model, tmp_path / "m.safetensors")


@pytest.mark.parametrize("args, expected", [
    # nan passes every range check; inf breaks the clock: both failed with a traceback after the run dir was made
    (["--time-budget", "nan"], "train.time_budget (--time-budget) must be a finite number, not nan"),
    (["--time-budget", "inf"], "train.time_budget (--time-budget) must be a finite number, not inf"),
    (["--lr", "nan"], "optim.lr (--lr) must be a finite number"),
    (["--val-split", "nan"], "data.val_split (--val-split) must be a finite number"),  # was: trained with no validation at all
    (["--set", "model.dropout=.nan"], "model.dropout must be a finite number"),
    (["--set", "augment.hflip=.nan"], "augment.hflip must be a finite number"),
    (["--seed", str(10**20)], "train.seed (--seed) must be <= 9223372036854775807"),  # was: torch's overflow traceback
    (["--set", f"data.split_seed={10**20}"], "data.split_seed must be <= 9223372036854775807"),
    (["--set", "model.in_chans=1"], "model.in_chans must be 3"),  # was: a traceback at the first step
    (["--recipe", "BINARY"], "not a text file"),  # was: UnicodeDecodeError traceback
    (["--recipe", "INTKEY"], "unknown section '1'"),  # was: TypeError traceback in difflib
    (["--data", ""], "DATA is empty"),  # was: the current directory taken as an ImageFolder
    (["--img-size", "0"], "model.img_size (--img-size) must be a positive integer or [height, width], not 0"),
    (["--set", "train.threads=100000000000000000000"], "train.threads must be <= 4096"),  # was: an overflow
    (["--recipe", "BADYAML"], "not valid YAML at line 3, column 1"),  # where in the file
    (["--recipe", "DIR"], "a directory, not a file"),
    (["--set", "foo.bar=1"], "--set: unknown section 'foo'"),
    # these three were tracebacks at the first step, after the run directory was made
    (["--set", "augment.scale=[1.0, 0.5]"], "augment.scale [1.0, 0.5]: must be [min, max]"),
    (["--set", "optim.name=sgd", "--set", "optim.nesterov=true", "--set", "optim.momentum=0"],
     "optim.nesterov needs optim.momentum > 0"),
    (["--set", "train.attention=efficient", "--device", "cpu"], "train.attention efficient is a CUDA kernel; on cpu"),
    (["--set", "model.stem_init=whiten"], "model.stem_init whiten needs a model with a conv_stem"),
    (["--set", "model.stem_init=whiten", "--weights", "m.safetensors"],
     "model.stem_init whiten initialises a new model; model.weights (--weights) m.safetensors brings its own"),
])
def test_bad_train_input_one_line_before_any_work(tmp_path, capsys, args, expected):
    (tmp_path / "bin.yaml").write_bytes(bytes(range(128, 256)) * 3)
    (tmp_path / "int.yaml").write_text("1: 2\n")
    (tmp_path / "bad.yaml").write_text("optim:\n  - [lr: 1\n")
    args = [{"BINARY": str(tmp_path / "bin.yaml"), "INTKEY": str(tmp_path / "int.yaml"),
             "BADYAML": str(tmp_path / "bad.yaml"), "DIR": str(tmp_path)}.get(a, a) for a in args]
    recipe = [] if "--recipe" in args else ["--recipe", str(write_recipe(tmp_path / "r.yaml"))]
    capsys.readouterr()
    assert main(["train", *recipe, *args, "--out", str(tmp_path / "run")]) == 2
    assert expected in one_line_error(capsys, "train")
    assert not (tmp_path / "run").exists()


def test_unwritable_run_dir_is_one_line(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    mkdir = pathlib.Path.mkdir

    def read_only(self, *a, **k):
        if self == run:
            raise OSError(30, "Read-only file system", str(self))
        return mkdir(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    capsys.readouterr()
    assert main(["train", "--recipe", str(write_recipe(tmp_path / "r.yaml")), "--out", str(run)]) == 2
    assert f"cannot write the run directory {run} (Read-only file system)" in one_line_error(capsys, "train")


def test_python_api_takes_paths(tmp_path, checkpoint):
    with pytest.raises(DataError, match="no such file or directory"):  # was: "data.path must be a string"
        vitkit.train_model(write_recipe(tmp_path / "r.yaml"), data=tmp_path / "nothing", out=tmp_path / "run")
    with pytest.raises(DataError, match="no such file or directory"):  # was: TypeError in is_shards
        vitkit.evaluate_model(checkpoint, tmp_path / "nothing")
    with pytest.raises(DataError, match="--amp fp61"):  # was: taken as fp16
        vitkit.evaluate_model(checkpoint, "digits", amp="fp61")


@pytest.mark.parametrize("args, expected", [
    (["--out", "FILE"], "--out FILE: cannot write confusion.png there"),  # was: FileExistsError after evaluating
    (["--batch-size", "0"], "--batch-size 0: must be an integer >= 1"),  # was: torch's message, after loading
    (["--workers", "-1"], "--workers -1: must be an integer >= 0"),
    (["--split-seed", str(10**20)], f"--split-seed {10**20}: must be an integer in [0, 2**63)"),
])
def test_bad_eval_input_one_line_before_any_work(tmp_path, capsys, monkeypatch, checkpoint, args, expected):
    import vitkit.data.datasets as datasets

    def no_work(*a, **k):
        raise AssertionError("the data was opened: the error came after work started")

    monkeypatch.setattr(datasets, "open_data", no_work)
    (tmp_path / "file").write_text("x")
    args = [str(tmp_path / "file") if a == "FILE" else a for a in args]
    expected = expected.replace("FILE", str(tmp_path / "file"))
    out = [] if "--out" in args else ["--out", str(tmp_path)]
    capsys.readouterr()
    assert main(["eval", "--data", "digits", "--weights", str(checkpoint), *args, *out]) == 2
    assert expected in one_line_error(capsys, "eval")


def test_eval_results_survive_an_unwritable_picture(tmp_path, capsys, monkeypatch, checkpoint):
    import vitkit.train.report as report

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "plot_confusion", full_disk)
    capsys.readouterr()
    assert main(["eval", "--data", "digits", "--weights", str(checkpoint), "--json", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert '"top1"' in out and '"confusion_png": null' in out


def test_recipe_errors_are_recipe_errors():
    from vitkit.train import recipe as R

    with pytest.raises(RecipeError, match="unknown key optim.1"):
        R.merge(R.defaults(), {"optim": {1: 2}}, "x.yaml")


def test_run_directories_that_would_damage_something_are_refused(tmp_path, capsys):
    """--out inside the data folder wrote the run's files into the dataset (the next run found a class
    "tensorboard"); a folder holding other files is not a run directory to write into."""
    from train_utils import digit_images

    digit_images(tmp_path / "ds", ["1", "2"], per_class=4)
    recipe = str(write_recipe(tmp_path / "r.yaml", data={"path": str(tmp_path / "ds")}))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    for out, expected in [(tmp_path / "ds", "is inside the data folder"), (tmp_path / "ds" / "run", "inside the data"),
                          (tmp_path / "notes", "a folder with other files in it, not a run directory")]:
        capsys.readouterr()
        assert main(["train", "--recipe", recipe, "--out", str(out)]) == 2
        assert expected in one_line_error(capsys, "train")
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["1", "2"]
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["todo.txt"]


def test_a_run_whose_state_was_removed_keeps_its_weights(tmp_path, capsys):
    """Removing state.pt and state.prev.pt (to free space) left a folder with recipe.yaml, which `--out` took for a
    run stopped before its first checkpoint: a new run wrote over its best.safetensors without a word."""
    from train_utils import digit_images

    digit_images(tmp_path / "ds", ["1", "2"], per_class=4)
    recipe = str(write_recipe(tmp_path / "r.yaml", data={"path": str(tmp_path / "ds"), "batch_size": 4},
                              train={"epochs": 1}))
    run = tmp_path / "run"
    assert main(["train", "--recipe", recipe, "--out", str(run)]) == 0
    for state in ("state.pt", "state.prev.pt"):
        (run / state).unlink(missing_ok=True)
    weights = {p.name: p.read_bytes() for p in run.glob("*.safetensors")}
    assert sorted(weights) == ["best.safetensors", "last.safetensors"]
    capsys.readouterr()
    assert main(["train", "--recipe", recipe, "--out", str(run)]) == 2
    assert f"holds a run's weights (last.safetensors) that this run would replace; pick another --out (--weights " \
        f"{run / 'last.safetensors'} starts from them)" in one_line_error(capsys, "train")
    assert main(["train", "--resume", str(run)]) == 2
    assert f"no state.pt (removed?), only its weights; start a new run from them with --weights " \
        f"{run / 'last.safetensors'}" in one_line_error(capsys, "train")
    assert {p.name: p.read_bytes() for p in run.glob("*.safetensors")} == weights


def test_resume_refuses_what_it_would_ignore_or_misread(tmp_path, capsys):
    """--weights on --resume was ignored without a word; a run stopped before its first checkpoint was "not a
    run directory"; data that changed under a run (same classes, fewer images) moved every step's place in the
    epoch without a word."""
    from train_utils import digit_images

    files = digit_images(tmp_path / "ds", ["1", "2"], per_class=10)
    recipe = str(write_recipe(tmp_path / "r.yaml", data={"path": str(tmp_path / "ds"), "batch_size": 4},
                              train={"epochs": 1}))
    run = tmp_path / "run"
    assert main(["train", "--recipe", recipe, "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--weights", str(run / "best.safetensors")]) == 2
    assert "continues from the run's own weights, not --weights" in one_line_error(capsys, "train")
    for f in files["1"][:3]:
        f.unlink()
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    assert "the data changed since the run started (16 training and 4 validation images then, 14 and 3 now)" in \
        one_line_error(capsys, "train")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "recipe.yaml").write_text("{}")
    assert main(["train", "--resume", str(tmp_path / "half")]) == 2
    hint = f"start it again with --recipe {tmp_path / 'half' / 'recipe.yaml'} --out {tmp_path / 'half'}"
    assert hint in one_line_error(capsys, "train")


def test_python_values_are_dotted_keys(tmp_path):
    with pytest.raises(RecipeError, match=r"values: keys are 'section.key' strings.*not 'optim'"):
        vitkit.train_model(write_recipe(tmp_path / "r.yaml"), out=tmp_path / "run", values={"optim": {"lr": 1}})
    with pytest.raises(RecipeError, match="not 1"):
        vitkit.train_model(write_recipe(tmp_path / "r.yaml"), out=tmp_path / "run", values={1: 2})
    assert not (tmp_path / "run").exists()


def test_numbers_in_strings_keep_their_kind():
    from vitkit.train import recipe as R

    epochs = R.merge(R.defaults(), {"train": {"epochs": "1e2"}}, "x.yaml")["train"]["epochs"]  # YAML 1.1: a string
    assert epochs == 100 and R.SCHEMA["train"]["epochs"][1](epochs) is None  # was: "must be an integer, not 100.0"
    assert R._numeric("5") == 5 and R._numeric("5.0") == 5.0 and R._numeric("1e-3") == 0.001


# --- data that is there but not as expected (session 20 review) -------------------------------------------------
def _photos(folder: Path, classes: dict[str, int], size: int = 80, truncate: bool = False) -> None:
    """JPEGs of `size` px (larger than what is preloaded) per class; `truncate`: cut to half (the header reads)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, n in classes.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
            data = buf.getvalue()
            (folder / name / f"{i}.jpg").write_bytes(data[: len(data) // 2] if truncate else data)


def _ab_model(tmp_path: Path, classes=("a", "b"), img: int = 40) -> Path:
    model = ViT(ViTConfig(img_size=img, patch_size=8, width=16, depth=1, num_heads=2, mlp_dim=32,
                          num_classes=len(classes)))
    model.class_names = list(classes)
    return vitkit.save_model(model, tmp_path / "ab.safetensors")


def test_nothing_readable_is_an_error_not_a_score(tmp_path, capsys, caplog):
    """Images whose headers read but whose pixels do not (too large to be preloaded): one line before any work, for
    training and eval (training used to save an untrained model and exit 0, then to stop in its first epoch; eval
    crashed on its text output, or printed top-1 0.0 for n = 0 with --json)."""
    junk, run = tmp_path / "junk", tmp_path / "run"
    _photos(junk, {"a": 4, "b": 4}, truncate=True)
    recipe = write_recipe(tmp_path / "r.yaml", data={"path": str(junk), "val_split": 0.5, "batch_size": 2},
                          model={"img_size": 40, "patch_size": 8})
    assert main(["train", "--recipe", str(recipe), "--out", str(run)]) == 2
    err = one_line_error(capsys, "train")
    assert err.endswith(f"{junk / 'a'}: none of its images is readable (nor those of 1 more classes)"), err
    assert not (run / "best.safetensors").exists() and not (run / "state.pt").exists()
    for json_flag in ([], ["--json"]):
        code = main(["eval", "--data", str(junk), "--weights", str(_ab_model(tmp_path)), "--out", str(tmp_path),
                     *json_flag])
        err = one_line_error(capsys, "eval")
        assert code == 2 and "none of its images is readable" in err, err


def test_names_that_are_not_utf8(tmp_path, capsys):
    """A file or class folder named with bytes that are not UTF-8 (Python keeps them as surrogates): the preload
    cache key crashed on the file, and eval's picture and text output on the class; now both are used and shown."""
    import os

    from train_utils import digit_images

    small = tmp_path / "small"  # 8x8 PNGs: preloaded and cached
    files = digit_images(small, ["1", "2"], per_class=6)
    os.link(files["1"][0], os.fsencode(small / "1") + b"/\xff\xfe.png")
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", data={"path": str(small), "val_split": 0.5, "batch_size": 2},
                          train={"epochs": 1})
    assert main(["train", "--recipe", str(recipe), "--out", str(run)]) == 0, capsys.readouterr().err
    odd = tmp_path / "odd"
    _photos(odd, {"a": 2, "b": 2})
    os.rename(odd / "b", os.fsencode(odd) + b"/\xe9t\xe9")
    classes = ("a", os.fsdecode(b"\xe9t\xe9"))
    capsys.readouterr()
    assert main(["eval", "--data", str(odd), "--weights", str(_ab_model(tmp_path, classes)), "--out",
                 str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "\ufffdt\ufffd" in out and "on 4 images" in out, out
    assert (tmp_path / "confusion.png").stat().st_size > 1000
    assert b"\xe9t\xe9" in (tmp_path / "confusion.csv").read_bytes()  # the folder's own bytes


def test_shard_patterns_and_classes(tmp_path, capsys):
    """An unbalanced brace was a braceexpand traceback; shards of one class trained a useless model (a folder of one
    class is refused)."""
    from test_train import digit_shards

    recipe = str(write_recipe(tmp_path / "r.yaml", data={"val_split": 0, "batch_size": 4}))
    assert main(["train", "--recipe", recipe, "--data", str(tmp_path / "s-{000..001.tar")]) == 2
    assert "s-{000..001.tar: not a shard pattern (" in one_line_error(capsys, "train")
    one = tmp_path / "one"
    one.mkdir()
    pattern = digit_shards(one, 1, 1)  # the first digit only: one class
    (one / "classes.txt").write_text("zero\none\n")
    assert main(["train", "--recipe", recipe, "--data", pattern, "--out", str(tmp_path / "run")]) == 2
    assert "every sample has label 0 (zero); training needs at least two classes" in one_line_error(capsys, "train")
    assert not (tmp_path / "run").exists()
    # missing shards are named first, not the held-out fraction the recipe asks of them
    assert main(["train", "--recipe", recipe, "--data", str(one / "none-{0..1}.tar"), "--val-split", "0.2"]) == 2
    assert "none-{0..1}.tar: 2 of 2 shards missing, e.g." in one_line_error(capsys, "train")
    assert main(["train", "--recipe", recipe, "--data", pattern, "--val-split", "0.2"]) == 2
    assert "--val-split (data.val_split) needs an indexed dataset, not a stream of shards" in one_line_error(capsys,
                                                                                                          "train")


def test_held_out_fractions_that_leave_classes_or_everything_out(tmp_path, capsys, caplog):
    from train_utils import digit_images

    folder = tmp_path / "imb"
    digit_images(folder, ["1"], per_class=2), digit_images(folder, ["2"], per_class=12)
    digit_images(folder, ["3"], per_class=1)
    recipe = str(write_recipe(tmp_path / "r.yaml", data={"path": str(folder), "batch_size": 1},
                              train={"epochs": 1}))
    assert main(["train", "--recipe", recipe, "--val-split", "0.75", "--out", str(tmp_path / "run")]) == 0
    assert "a held-out fraction of 0.75 (--val-split) leaves no training image of classes 1, 3" in caplog.text
    capsys.readouterr()
    assert main(["train", "--recipe", recipe, "--val-split", "0.9999", "--out", str(tmp_path / "run2")]) == 2
    assert "a held-out fraction of 0.9999 (--val-split, data.val_split) leaves none of its 15 images to train on" \
        in one_line_error(capsys, "train")


def test_resume_of_a_state_vitkit_did_not_write(tmp_path, capsys):
    import torch

    for content in ({"model": {}, "epoch": 3}, [1, 2]):
        run = tmp_path / type(content).__name__
        run.mkdir()
        torch.save(content, run / "state.pt")
        write_recipe(run / "recipe.yaml")
        assert main(["train", "--resume", str(run)]) == 2
        err = one_line_error(capsys, "train")
        assert "state.pt is not a vitkit training state (" + ("no step, total_steps, optimizer" if content != [1, 2]
                                                             else "a list") in err, err


def test_resume_reads_relative_data_where_the_run_started(tmp_path, capsys, monkeypatch):
    """`--data flat` started in A and resumed from B (which has its own flat/ of the same shape) trained on B's
    images without a word; from a folder without flat/ it failed. The run records where it started."""
    from train_utils import digit_images
    from vitkit.weights.vitkit_format import read_metadata

    for place, offset in (("A", 0), ("B", 20)):
        digit_images(tmp_path / place / "flat", ["1", "2"], per_class=6, offset=offset)
    recipe = write_recipe(tmp_path / "r.yaml", data={"path": "flat", "val_split": 0.5, "batch_size": 2},
                          train={"epochs": 1})
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path / "A")
    assert main(["train", "--recipe", str(recipe), "--out", str(run)]) == 0
    for place, epochs in (("B", "2"), (".", "3")):
        monkeypatch.chdir(tmp_path / place)
        capsys.readouterr()
        assert main(["train", "--resume", str(run), "--epochs", epochs]) == 0, capsys.readouterr().err
        assert read_metadata(run / "last.safetensors")["data"]["resolved"] == str(tmp_path / "A" / "flat")
        assert read_metadata(run / "last.safetensors")["train"]["epoch"] == int(epochs)


def test_resume_applies_the_new_optimizer_settings_and_refuses_another_optimizer(tmp_path, capsys):
    """A resume that changed weight decay or betas kept the saved ones while recipe.yaml said the new; one with
    another optimizer crashed at the first step (KeyError inside torch's SGD)."""
    import torch

    recipe = str(write_recipe(tmp_path / "r.yaml", data={"path": "digits", "batch_size": 64}, train={"epochs": 1}))
    run = tmp_path / "run"
    assert main(["train", "--recipe", recipe, "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "2", "--set", "optim.name=sgd"]) == 2
    assert "optim.name cannot change in a run (adamw -> sgd)" in one_line_error(capsys, "train")
    assert main(["train", "--resume", str(run), "--epochs", "2", "--set", "optim.weight_decay=0.5",
                 "--set", "optim.betas=[0.8, 0.9]"]) == 0
    groups = torch.load(run / "state.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0] and all(tuple(g["betas"]) == (0.8, 0.9) for g in groups)


def test_resume_before_any_export_needs_only_the_run_directory(tmp_path, capsys):
    """Killed after a mid-epoch save and before the first epoch's end, a fine-tuning run has state.pt and no
    last.safetensors: its resume built the model from the file it started from, and failed once that was gone."""
    import torch

    from train_utils import TINY

    fields = {k: v for k, v in TINY["model"].items() if k != "crop_pct"}
    start = ViT(ViTConfig(**fields, num_classes=3))
    start.preprocess.update(mean=(0.25,) * 3, std=(0.5,) * 3)
    vitkit.save_model(start, tmp_path / "start.safetensors")
    recipe = str(write_recipe(tmp_path / "r.yaml", data={"path": "digits", "batch_size": 64}, train={"epochs": 2},
                              model={"weights": str(tmp_path / "start.safetensors")}))
    import shutil

    run, exported = tmp_path / "run", tmp_path / "exported"
    assert main(["train", "--recipe", recipe, "--out", str(run), "--epochs", "1"]) == 0
    shutil.copytree(run, exported)  # the same run with its exports, resumed as before
    (run / "last.safetensors").unlink()  # as if killed before they were written
    (run / "best.safetensors").unlink()
    (tmp_path / "start.safetensors").unlink()
    capsys.readouterr()
    for folder in (run, exported):
        assert main(["train", "--resume", str(folder), "--epochs", "2"]) == 0
    resumed, straight = vitkit.load_model(run / "last.safetensors"), vitkit.load_model(exported / "last.safetensors")
    assert tuple(resumed.preprocess["mean"]) == (0.25,) * 3  # the start file's normalisation, as the run had
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), straight.state_dict().values()))


def test_train_takes_a_non_square_size_and_names_an_unusable_cache(tmp_path, capsys):
    recipe = str(write_recipe(tmp_path / "r.yaml", train={"epochs": 1}))
    assert main(["train", "--recipe", recipe, "--img-size", "8x16", "--out", str(tmp_path / "run")]) == 0
    assert vitkit.load_model(tmp_path / "run" / "last.safetensors").cfg.img_size == (8, 16)
    from train_utils import digit_images

    digit_images(tmp_path / "ds", ["1", "2"], per_class=10)
    (tmp_path / "file").write_text("in the way")
    capsys.readouterr()
    assert main(["train", "--recipe", recipe, "--data", str(tmp_path / "ds"),
                 "--set", f"data.cache_dir={tmp_path / 'file' / 'cache'}",
                 "--set", "data.preload=true", "--out", str(tmp_path / "run2")]) == 2
    assert f"data.cache_dir {tmp_path / 'file' / 'cache'}: cannot create it" in one_line_error(capsys, "train")


def test_eval_reads_a_runs_data_as_the_run_did(tmp_path, monkeypatch):
    """With unreadable images, data.preload decides which images a held-out fraction is drawn from (preloading
    drops them first): eval took its default and could score training images as held-out."""
    import vitkit.data.datasets as datasets
    from train_utils import digit_images

    digit_images(tmp_path / "ds", ["1", "2"], per_class=10)
    for n in range(3):
        (tmp_path / "ds" / "1" / f"broken{n}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    recipe = str(write_recipe(tmp_path / "r.yaml", data={"path": str(tmp_path / "ds"), "batch_size": 4,
                                                          "preload": False}, train={"epochs": 1}))
    assert main(["train", "--recipe", recipe, "--out", str(tmp_path / "run")]) == 0
    opened, real = [], datasets.open_data
    monkeypatch.setattr(datasets, "open_data", lambda *a, **kw: opened.append(kw) or real(*a, **kw))
    result = vitkit.evaluate_model(tmp_path / "run" / "best.safetensors", str(tmp_path / "ds"))
    trained = real(str(tmp_path / "ds"), val_split=0.2, preload=False)
    assert opened[0]["preload"] is False and result.n == len(trained.val) - len(
        [i for i in trained.val.indices if "broken" in str(trained.val.dataset.paths[i])])


def test_a_recipe_cannot_reshape_a_vitkit_checkpoints_model(tmp_path, capsys, checkpoint):
    """digits-style recipes set the architecture; with a vitkit checkpoint that was a shape-mismatch line."""
    recipe = str(write_recipe(tmp_path / "r.yaml", model={"weights": str(checkpoint)}))  # TINY: width 32, gap
    assert main(["train", "--recipe", recipe, "--out", str(tmp_path / "run")]) == 2
    err = one_line_error(capsys, "train")
    assert f"model.width 32: model.weights {checkpoint} holds a model with width 16, and a vitkit checkpoint brings " \
           "its architecture (drop model.width)" in err and "model.mlp_dim 64" in err and "model.class_token" in err
    assert not (tmp_path / "run").exists()


def test_same_size_on_resume_non_rgb_checkpoints_and_eval_messages(tmp_path, capsys, caplog):
    """A resume given the same size as HxW; a vitkit checkpoint that does not take RGB; eval's messages."""
    recipe = str(write_recipe(tmp_path / "r.yaml", train={"epochs": 1}))
    assert main(["train", "--recipe", recipe, "--out", str(tmp_path / "run")]) == 0
    assert main(["train", "--resume", str(tmp_path / "run"), "--epochs", "2", "--img-size", "8x8"]) == 0
    with caplog.at_level("WARNING", logger="vitkit"):
        vitkit.evaluate_model(tmp_path / "run" / "best.safetensors", "digits", val_split=0)
    assert "(--val-split 0: its held-out 20% among them): these are training images" in caplog.text
    caplog.clear()  # another held-out part of the run's data: the images in it the run trained on are counted
    from vitkit.data.datasets import open_data  # a larger fraction, same seed: the run's 20% and more

    held = {f: len(open_data("digits", val_split=f, evaluate_only=True).val) for f in (0.2, 0.5)}
    for kw, extra in [({"val_split": 0.1}, 0), ({"val_split": 0.5}, held[0.5] - held[0.2]), ({"split_seed": 1}, None)]:
        with caplog.at_level("WARNING", logger="vitkit"):
            result = vitkit.evaluate_model(tmp_path / "run" / "best.safetensors", "digits", **kw)
        said = re.search(r"(\d+) of these (\d+) images are ones \S+ trained on: it held out 20% with seed 0",
                         caplog.text)
        trained = int(said[1]) if said else 0
        assert trained == extra if extra is not None else 0 < trained < result.n, caplog.text
        assert said is None or int(said[2]) == result.n
        caplog.clear()
    gray = ViT(ViTConfig(img_size=8, patch_size=2, width=16, depth=1, num_heads=2, mlp_dim=32, num_classes=10,
                         in_chans=1))
    vitkit.save_model(gray, tmp_path / "gray.safetensors")
    capsys.readouterr()
    assert main(["train", "--data", "digits", "--weights", str(tmp_path / "gray.safetensors"),
                 "--out", str(tmp_path / "run2")]) == 2
    assert "the model takes 1-channel input, and images are read as RGB (3 channels)" in one_line_error(capsys,
                                                                                                      "train")
    with pytest.raises(DataError, match=r"^the model takes 1-channel input"):
        vitkit.evaluate_model(gray, "digits")


def test_data_changed_under_a_run_is_noticed_by_eval_and_resume(tmp_path, capsys, caplog):
    """One image added (eval) or two renamed (resume, as many images): the held-out split was drawn again from the
    new file list, silently (eval scored training images as held-out; the resume went on on another split)."""
    from train_utils import digit_images

    files = digit_images(tmp_path / "ds", ["1", "2"], per_class=10)
    recipe = str(write_recipe(tmp_path / "r.yaml", data={"path": str(tmp_path / "ds"), "batch_size": 4},
                              train={"epochs": 1}))
    run = tmp_path / "run"
    assert main(["train", "--recipe", recipe, "--out", str(run)]) == 0
    with caplog.at_level("WARNING", logger="vitkit"):
        vitkit.evaluate_model(run / "best.safetensors", str(tmp_path / "ds"))
    assert "changed since" not in caplog.text
    files["1"][0].rename(files["1"][0].with_name("renamed-a.png"))
    files["2"][0].rename(files["2"][0].with_name("renamed-b.png"))
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    assert "the data changed since the run started (as many images, but other files" in one_line_error(capsys, "train")
    with caplog.at_level("WARNING", logger="vitkit"):
        vitkit.evaluate_model(run / "best.safetensors", str(tmp_path / "ds"))
    assert "changed since" in caplog.text and "so these may include images it trained on" in caplog.text


def test_a_resume_whose_files_were_not_known_is_not_refused(tmp_path, capsys):
    """A state (or preload cache) from an older version knows no file names: not a change of data."""
    import torch

    from train_utils import digit_images

    digit_images(tmp_path / "ds", ["1", "2"], per_class=10)
    recipe = str(write_recipe(tmp_path / "r.yaml", data={"path": str(tmp_path / "ds"), "batch_size": 4},
                              train={"epochs": 1}))
    run = tmp_path / "run"
    assert main(["train", "--recipe", recipe, "--out", str(run)]) == 0
    state = torch.load(run / "state.pt", weights_only=True)
    assert all(state["data_files"])
    state["data_files"] = [None, None]
    torch.save(state, run / "state.pt")
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
