"""`vitkit train` / `vitkit eval` on real data (digits, image folders, archives, shards) with tiny models:
run-directory files read back, eval numbers against a direct computation, fine-tuning, time budget,
non-finite loss, bad inputs."""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

import vitkit
from vitkit.cli import main
from vitkit.data.datasets import open_data, stratified_split
from vitkit.models.vit import resample_pos_embed
from vitkit.train import recipe as R
from vitkit.train.report import read_metrics
from vitkit.train.trainer import attention_kernel, build_model, ema_model, lr_at, make_optimizer, pick_attention
from vitkit.weights.vitkit_format import read_metadata

from train_utils import ROOT, SHARED, TINY, digit_images, env, write_recipe


def train_ok(*args: str) -> None:
    assert main(["train", *args]) == 0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-epoch run of the tiny ViT on digits (20% held out)."""
    tmp = tmp_path_factory.mktemp("tiny")
    run = tmp / "run"
    train_ok("--recipe", str(write_recipe(tmp / "tiny.yaml")), "--out", str(run))
    return run


def digits_tensors():
    """Digits as the model sees them, computed here without vitkit's data code: (N,3,8,8) in [-1,1], labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.rint(d.images * (255 / 16)).astype(np.uint8)).float().div(255)
    return ((x - 0.5) / 0.5)[:, None].repeat(1, 3, 1, 1), torch.from_numpy(d.target)


# --- the run directory ------------------------------------------------------------------------------------
def test_run_dir_files_read_back(tiny_run):
    assert set(p.name for p in tiny_run.iterdir()) >= {"recipe.yaml", "metrics.csv", "tensorboard", "best.safetensors",
                                                       "last.safetensors", "state.pt", "curves.png"}
    recipe = yaml.safe_load((tiny_run / "recipe.yaml").read_text())
    assert recipe == R.load(None, base=recipe)  # complete and valid as written
    assert recipe["model"]["width"] == 32 and recipe["data"]["path"] == "digits"

    rows = read_metrics(tiny_run / "metrics.csv")
    steps_per_epoch = int(1797 * 0.8 + 0.5) // 64  # 1438 training images, 64 per step
    assert [r["epoch"] for r in rows] == [1.0, 2.0] and [r["step"] for r in rows] == [steps_per_epoch, 2 * steps_per_epoch]
    assert all(0 <= r["val_top1"] <= r["val_top5"] <= 1 and r["train_loss"] > 0 for r in rows)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tiny_run / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("val/val_top1")] == pytest.approx([r["val_top1"] for r in rows], abs=1e-5)

    state = torch.load(tiny_run / "state.pt", weights_only=True)  # plain tensors and containers only
    assert state["step"] == 2 * steps_per_epoch and state["class_names"] == [str(i) for i in range(10)]
    last = vitkit.load_model(tiny_run / "last.safetensors")
    assert last.class_names == [str(i) for i in range(10)] and last.preprocess["crop_pct"] == 1.0
    for k, v in last.state_dict().items():  # last.safetensors = the model of the training state (no EMA)
        assert torch.equal(v, state["model"][k]), k
    best = vitkit.load_model(tiny_run / "best.safetensors")
    assert best.cfg.width == 32 and best.cfg.img_size == (8, 8)
    with Image.open(tiny_run / "curves.png") as im:
        assert im.format == "PNG" and im.width > 500


def test_train_and_evaluate_from_python(tmp_path):
    """vitkit.train_model / vitkit.evaluate_model do what `vitkit train` / `vitkit eval` do."""
    run = vitkit.train_model(write_recipe(tmp_path / "r.yaml"), out=tmp_path / "run", epochs=1,
                             values={"optim.lr": 0.004})
    assert run == tmp_path / "run" and yaml.safe_load((run / "recipe.yaml").read_text())["optim"]["lr"] == 0.004
    result = vitkit.evaluate_model(run / "best.safetensors", "digits")  # the run's held-out split, recorded
    assert result.n == 359 and result.top1 == read_metadata(run / "best.safetensors")["train"]["val_top1"]
    model = vitkit.load_model(run / "best.safetensors")
    assert vitkit.evaluate_model(model, "digits", val_split=0.2).top1 == result.top1  # a model: say the split
    assert vitkit.evaluate_model(model, "digits").n == 1797  # else all of it
    assert vitkit.train_model(resume=run, epochs=2) == run
    assert torch.load(run / "state.pt", weights_only=True)["step"] == 2 * 22
    with pytest.raises(TypeError, match="unknown options"):
        vitkit.train_model(write_recipe(tmp_path / "r.yaml"), learning_rate=0.1)
    with pytest.raises(R.RecipeError, match=r"optim.lr \(--lr\) must be > 0"):
        vitkit.train_model(write_recipe(tmp_path / "r.yaml"), out=tmp_path / "bad", lr=-1.0)
    with pytest.raises(ValueError, match="no such file"):
        vitkit.evaluate_model(model, str(tmp_path / "nothing"))
    # a script that set up no logging sees the run's lines as the command prints them
    script = f"import vitkit; vitkit.train_model({str(tmp_path / 'r.yaml')!r}, out={str(tmp_path / 'py')!r}, epochs=1)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env(), timeout=300)
    assert done.returncode == 0 and "digits: 10 classes" in done.stderr and "done in" in done.stderr, done.stderr


def test_eval_matches_direct_computation(tiny_run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["eval", "--data", "digits", "--weights", str(tiny_run / "best.safetensors"), "--json",
                 "--workers", "0", "--out", str(tmp_path)]) == 0
    got = json.loads(capsys.readouterr().out)
    # the checkpoint recorded its held-out split; recompute it and the predictions by hand
    x, y = digits_tensors()
    _, val_idx = stratified_split(y, 0.2, 0)
    model = vitkit.load_model(tiny_run / "best.safetensors")
    with torch.no_grad():
        logits = model(x[val_idx])
    y = y[val_idx]
    assert got["n"] == len(val_idx) == 359
    assert got["top1"] == pytest.approx((logits.argmax(1) == y).double().mean().item(), abs=1e-12)
    assert got["top5"] == pytest.approx((logits.topk(5, 1).indices == y[:, None]).any(1).double().mean().item(), abs=1e-12)
    for c in range(10):
        m = y == c
        assert got["per_class"][str(c)]["n"] == int(m.sum())
        assert got["per_class"][str(c)]["accuracy"] == pytest.approx((logits[m].argmax(1) == c).double().mean().item())
    # and the best checkpoint's accuracy is the best validation accuracy the run logged
    
    assert got["top1"] == read_metadata(tiny_run / "best.safetensors")["train"]["val_top1"]
    assert got["top1"] == pytest.approx(max(r["val_top1"] for r in read_metrics(tiny_run / "metrics.csv")), abs=1e-6)
    assert (tmp_path / "confusion.png").stat().st_size > 0
    rows = list(csv.reader(open(got["confusion_csv"])))  # the counts, also where the picture is skipped
    counts = torch.zeros(10, 10, dtype=torch.long).index_put_((y, logits.argmax(1)), torch.ones_like(y), accumulate=True)
    assert rows[0][1:] == [str(c) for c in range(10)] and [[int(v) for v in r[1:]] for r in rows[1:]] == counts.tolist()
    assert got["split"] == "held-out 20% (seed 0)"


def test_flip_tta_in_training_and_eval(tmp_path, capsys):
    """train.eval_tta / eval --tta flip score the mean of the logits of each image and its mirror image."""
    run = tmp_path / "run"
    train_ok("--recipe", str(write_recipe(tmp_path / "r.yaml", train={"epochs": 1, "eval_tta": "flip"})),
             "--out", str(run))
    capsys.readouterr()
    assert main(["eval", "--data", "digits", "--weights", str(run / "best.safetensors"), "--json", "--tta", "flip",
                 "--workers", "0", "--out", str(tmp_path)]) == 0
    got = json.loads(capsys.readouterr().out)
    x, y = digits_tensors()
    _, val_idx = stratified_split(y, 0.2, 0)
    x, y = x[val_idx], y[val_idx]
    model = vitkit.load_model(run / "best.safetensors")
    with torch.no_grad():
        plain = model(x)
        averaged = (plain + model(x.flip(-1))) / 2
    assert got["tta"] == "flip" and got["n"] == 359
    assert got["top1"] == pytest.approx((averaged.argmax(1) == y).double().mean().item(), abs=1e-12)
    assert got["loss"] == pytest.approx(F.cross_entropy(averaged, y).item(), rel=1e-5)
    assert got["loss"] != pytest.approx(F.cross_entropy(plain, y).item(), rel=1e-3)  # digits are not mirror-symmetric
    meta = read_metadata(run / "best.safetensors")
    assert meta["train"]["val_tta"] == "flip" and meta["train"]["val_top1"] == got["top1"]  # validated the same way
    # the checkpoint carries the resolved recipe it was trained with, the same as the run's recipe.yaml
    assert meta["recipe"] == yaml.safe_load((run / "recipe.yaml").read_text())
    assert meta["recipe"]["train"]["eval_tta"] == "flip" and meta["recipe"]["data"]["path"] == "digits"


def test_eval_folder_classes_matched_by_name(tiny_run, tmp_path, capsys):
    """A folder with only classes 3 and 7 (labels 0 and 1 there), one corrupt file: matched by name, skipped."""
    files = digit_images(tmp_path / "two", ["3", "7"], per_class=10)
    (tmp_path / "two" / "7" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    capsys.readouterr()
    assert main(["eval", "--data", str(tmp_path / "two"), "--weights", str(tiny_run / "best.safetensors"),
                 "--json", "--workers", "0", "--out", str(tmp_path)]) == 0
    got = json.loads(capsys.readouterr().out)
    model = vitkit.load_model(tiny_run / "best.safetensors")
    x = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for c in "37" for p in files[c]])
    with torch.no_grad():
        pred = model((x.float() / 255 - 0.5) / 0.5).argmax(1)
    truth = torch.tensor([3] * 10 + [7] * 10)
    assert got["n"] == 20 and set(got["per_class"]) == {"3", "7"}
    assert got["top1"] == pytest.approx((pred == truth).double().mean().item())
    assert len(got["skipped"]) == 1 and "broken.png" in got["skipped"][0]

    (tmp_path / "two" / "cat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "two" / "cat" / "a.png")
    assert main(["eval", "--data", str(tmp_path / "two"), "--weights", str(tiny_run / "best.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "vitkit eval: error:" in err and "'cat'" in err


@pytest.mark.parametrize("args, expected", [
    (["--val-split", "2"], "--val-split 2.0: must be in [0, 1)"),
    (["--device", "tpu7"], "--device 'tpu7' is not a device name"),
    (["--weights", "RUN"], "a run directory; give its"),
    (["--data", str(ROOT / "README.md")], "README.md: not a directory or a .tar/.tar.gz archive"),
])
def test_eval_bad_inputs_one_line_error(tiny_run, tmp_path, capsys, args, expected):
    args = [str(tiny_run) if a == "RUN" else a for a in args]
    capsys.readouterr()
    code = main(["eval", "--data", "digits", "--weights", str(tiny_run / "best.safetensors"), *args,
                 "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("vitkit eval: error:") and "\n" not in err and expected in err, err


# --- fine-tuning, budget, failures ------------------------------------------------------------------------
def test_finetune_interpolates_positions_and_zeroes_head(tiny_run, tmp_path, caplog):
    """The paper's fine-tuning: new classes get a zero head; 16 px instead of 8 px resamples positions in 2D."""
    recipe = R.load(None, {"data.path": "digits", "model.weights": str(tiny_run / "best.safetensors"),
                           "model.img_size": 16})
    model = build_model(recipe["model"], ["0", "1", "2"])
    assert "head replaced: checkpoint has 10 classes, model 3" in caplog.text
    assert "position embeddings resampled from 4x4 to 8x8" in caplog.text
    source = vitkit.load_model(tiny_run / "best.safetensors")
    assert model.cfg.grid == (8, 8) and model.head.weight.shape == (3, 32)
    assert not model.head.weight.any() and not model.head.bias.any()
    assert torch.equal(model.pos_embed, resample_pos_embed(source.pos_embed, (8, 8), (4, 4), num_prefix=0))
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    digits = [str(i) for i in range(10)]  # the checkpoint's own classes keep its head; other ones, or
    letters = list("abcdefghij")          # zero_head, get a zero head even with as many classes
    for names, zero_head, kept in ((digits, None, True), (letters, None, False), (digits, True, False)):
        caplog.clear()
        m = build_model({**recipe["model"], "img_size": 8, "zero_head": zero_head}, names)
        assert torch.equal(m.head.weight, source.head.weight) == kept and m.head.weight.any() == kept
        assert ("head replaced by a zero-initialised one" in caplog.text) != kept  # and the user is told

    digit_images(tmp_path / "three", ["0", "1", "2"], per_class=30)
    recipe_file = write_recipe(tmp_path / "ft.yaml", model={"img_size": [16, 8]},
                               optim={"name": "sgd", "lr": 0.03, "clip_grad_norm": 1.0},
                               data={"path": str(tmp_path / "three"), "val_split": 0.2, "batch_size": 16},
                               train={"epochs": 1, "threads": 1})
    caplog.clear()
    caplog.set_level(logging.INFO, logger="vitkit")
    train_ok("--recipe", str(recipe_file), "--weights", str(tiny_run / "best.safetensors"), "--out", str(tmp_path / "ft"))
    assert "position embeddings resampled from 4x4 to 8x4" in caplog.text
    assert "ViT 32w x 1 @ 16x8px" in caplog.text  # the log said "@ 16px" for a 16x8 input
    tuned = vitkit.load_model(tmp_path / "ft" / "best.safetensors")
    assert tuned.class_names == ["0", "1", "2"] and tuned.cfg.img_size == (16, 8)


def test_summary_line_of_a_run_shorter_than_an_epoch(tmp_path, capsys):
    train_ok("--recipe", str(write_recipe(tmp_path / "r.yaml")), "--set", "train.max_steps=4", "--out",
             str(tmp_path / "run"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert len(lines) == 1 and lines[0].startswith("epoch   0.2/0.2  loss"), lines  # 4 of 22 steps
    capsys.readouterr()
    train_ok("--recipe", str(write_recipe(tmp_path / "r.yaml")), "--set", "train.max_steps=1", "--set",
             "data.batch_size=8", "--out", str(tmp_path / "run1"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert lines[0].startswith("epoch 0.006/0.006  loss"), lines  # 1 of 179 steps (was 0.0/0.0)


def test_budget_fit_adds_no_step_when_no_time_is_left():
    from vitkit.train.distributed import Dist
    from vitkit.train.trainer import _fit

    assert _fit(100, 1000, 0.0, 0.1, Dist()) == 100  # the run ends here, its schedule not lengthened
    assert _fit(100, 1000, -5.0, 0.1, Dist()) == 100  # past the budget (the final evaluation's time taken off)
    assert _fit(100, 1000, 10.0, 0.1, Dist()) == 100 + 100  # the time left, in steps (the caller keeps a reserve)
    assert _fit(100, 150, 10.0, 0.1, Dist()) == 150  # never beyond the recipe's epochs


def test_time_budget_stops_gracefully(tmp_path):
    """...and its warm-up (a fraction of the steps, unknown until they are timed) rises by the clock until the
    schedule is fitted, then on from there: it used to take the fraction of the epoch cap until then, and jump
    at the fit (about half the peak in one step here)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train_ok("--recipe", str(write_recipe(tmp_path / "r.yaml", schedule={"warmup_fraction": 0.05},
                                          train={"log_every": 1})),
             "--epochs", "1000", "--time-budget", "0.1", "--out", str(run))
    state = torch.load(run / "state.pt", weights_only=True)
    assert 0 < state["step"] < 1000 * 22 and state["total_steps"] < 1000 * 22  # the schedule was fitted
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    lrs = [e.value for e in events.Scalars("train/lr")]
    peak = 0.003
    # the decay ends with the budget: near zero at the last step (a few % of the peak where the clock jittered in
    # the last epoch; without the fit it would be near the peak, 1000 epochs from the end)
    assert len(lrs) == state["step"] and max(lrs) <= peak * (1 + 1e-6) and lrs[-1] < 0.05 * peak
    # before any fit (the first epoch's 22 steps, the 23-step probe): the epoch cap's warm-up, 1100 steps, gave
    # step 21 about 2% of the peak; by the clock it gets a share of the warm-up's seconds, more on a slower machine
    assert lrs[20] > 0.05 * peak and all(b > a for a, b in zip(lrs[:20], lrs[1:21])), lrs[:21]
    assert state["elapsed"] < 6 + 20  # 6 s budget; slack for a busy machine
    rows = read_metrics(run / "metrics.csv")
    assert rows[-1]["step"] == state["step"] and rows[-1]["val_top1"] is not None  # evaluated at the end
    assert all(b["step"] > a["step"] for a, b in zip(rows, rows[1:]))  # one row per epoch (the last may be part)
    assert vitkit.load_model(run / "best.safetensors").class_names is not None


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tiny_run, tmp_path, capsys, caplog):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = {f: hashlib.sha1((run / f).read_bytes()).hexdigest() for f in ("state.pt", "state.prev.pt",
                                                                            "last.safetensors", "recipe.yaml")}
    capsys.readouterr()
    code = main(["train", "--resume", str(run), "--epochs", "3", "--set", "optim.lr=1e30"])
    assert code == 1
    assert before == {f: hashlib.sha1((run / f).read_bytes()).hexdigest() for f in before}
    # the way back past a save that may already hold diverged weights: the save before it
    assert f"the last checkpoint is {run / 'state.pt'} (step 44)" in caplog.text
    assert f"--resume {run / 'state.prev.pt'}, step 22" in caplog.text


def test_a_run_killed_in_its_first_save_resumes(tiny_run, tmp_path, monkeypatch):
    """The first save writes state.pt before the weights: a process killed between them (a large model's export
    takes seconds) leaves a state to resume from, not weights alone that no command would continue. The resumed
    run writes best.safetensors again (its state knew a best the file never got) and ends as the uninterrupted one."""
    from safetensors.torch import load_file

    class Killed(BaseException):  # as SIGKILL: no handler, no cleanup of the run's own
        pass

    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(vitkit, "save_model", killed)
    run = tmp_path / "run"
    with pytest.raises(Killed):
        main(["train", "--recipe", str(write_recipe(tmp_path / "r.yaml")), "--out", str(run)])
    assert (run / "state.pt").is_file() and not (run / "last.safetensors").exists()
    monkeypatch.undo()
    assert main(["train", "--resume", str(run)]) == 0
    for name in ("last.safetensors", "best.safetensors"):
        a, b = load_file(run / name), load_file(tiny_run / name)
        assert all(torch.equal(a[k], b[k]) for k in b), name
    # the first save of a 1-epoch run is its last too: the resume has nothing to train, and writes the weights
    monkeypatch.setattr(vitkit, "save_model", killed)
    with pytest.raises(Killed):
        main(["train", "--recipe", str(write_recipe(tmp_path / "one.yaml", train={"epochs": 1})), "--out",
              str(tmp_path / "one")])
    monkeypatch.undo()
    assert main(["train", "--resume", str(tmp_path / "one")]) == 0
    state = torch.load(tmp_path / "one" / "state.pt", weights_only=True)
    for name in ("last.safetensors", "best.safetensors"):
        weights = load_file(tmp_path / "one" / name)
        assert all(torch.equal(weights[k], state["model"][k]) for k in state["model"]), name
    assert read_metadata(tmp_path / "one" / "best.safetensors")["train"]["val_top1"] == state["best_top1"]


def test_resuming_says_what_changed_and_knows_its_own_folder(tmp_path, caplog, monkeypatch, capsys):
    """On --resume: a hand-edited recipe.yaml is said to be overruled by the state; changed values are listed; the
    training folder named another way (absolute, a trailing slash) is the run's own, not a change of data. A run
    directory where no file can be made is found before any training."""
    import vitkit.train.rundir as rundir

    digit_images(tmp_path / "imgs", ["1", "2"], per_class=20)
    recipe = write_recipe(tmp_path / "r.yaml", data={"path": "imgs", "val_split": 0.25, "batch_size": 10})
    monkeypatch.chdir(tmp_path)
    train_ok("--recipe", str(recipe), "--out", "run")
    text = (tmp_path / "run" / "recipe.yaml").read_text()
    (tmp_path / "run" / "recipe.yaml").write_text(text.replace("epochs: 2", "epochs: 9"))
    caplog.set_level(logging.INFO, logger="vitkit")
    train_ok("--resume", "run", "--epochs", "3", "--data", f"{tmp_path / 'imgs'}/", "--set", "optim.lr=0.004")
    assert "recipe.yaml differs from the recipe the run's state holds (edited?)" in caplog.text
    assert "resumed at step 6 with changed values: optim.lr 0.003 -> 0.004; train.epochs 2 -> 3" in caplog.text
    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["data"]["path"] == "imgs"

    def no_writing(path, *args, **kwargs):
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr(rundir, "replacing", no_writing)
    capsys.readouterr()
    assert main(["train", "--recipe", str(recipe), "--out", "ro"]) == 2
    err = capsys.readouterr().err
    assert "cannot write the run directory ro (Operation not permitted)" in err and "epoch" not in err


def test_a_damaged_metrics_csv_never_stops_a_run(tiny_run, tmp_path, caplog):
    """metrics.csv is a record: a note a spreadsheet added, zero bytes a crash left, a half-written row. The curves
    are drawn from the rows that are metrics, a resume drops the others (said once) and goes on."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    state = torch.load(run / "state.pt", weights_only=True)
    state["total_steps"] = 66  # a third epoch to train
    torch.save(state, run / "state.pt")
    good = (run / "metrics.csv").read_text()
    with open(run / "metrics.csv", "a") as f:
        f.write("# opened in a spreadsheet\n" + "\0" * 64 + "\n5,11")
    assert [r["step"] for r in read_metrics(run / "metrics.csv")] == [22, 44]
    assert vitkit.train.report.plot_curves(run / "metrics.csv", tmp_path / "curves.png") is not None
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 0
    assert "metrics.csv: 3 rows that are not metrics (edited or damaged) left out" in caplog.text
    assert (run / "metrics.csv").read_text().startswith(good)
    assert [r["step"] for r in read_metrics(run / "metrics.csv")] == [22, 44, 66]
    from vitkit.train.report import Metrics  # a row appended after a line left open goes on a line of its own

    with open(run / "metrics.csv", "a") as f:
        f.write("5,11")
    Metrics(tmp_path / "run", True).row(epoch=4.0, step=88, lr=0.0, train_loss=1.0, train_acc=0.5)
    assert [r["step"] for r in read_metrics(run / "metrics.csv")] == [22, 44, 66, 88]


def test_resume_from_the_previous_state_goes_back_one_save(tiny_run, tmp_path, caplog, capsys):
    """state.prev.pt holds the save before the last; --resume RUN/state.prev.pt trains the last epoch again from
    it and ends with the uninterrupted run's weights, bit for bit. Until its first save both states stay."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    prev, last = (torch.load(run / f, weights_only=True) for f in ("state.prev.pt", "state.pt"))
    assert (prev["step"], last["step"]) == (22, 44)  # epochs 1 and 2 of 22 steps
    def files():
        return {f: hashlib.sha1((run / f).read_bytes()).hexdigest() for f in ("state.pt", "state.prev.pt",
                                                                                "metrics.csv")} | \
            {"tensorboard": sorted(os.listdir(run / "tensorboard"))}

    before = files()
    # going back, then stopping before any save (nothing to train; a divergence after a step it logged): both
    # states as they were, and the later state's metrics too
    assert main(["train", "--resume", str(run / "state.prev.pt"), "--epochs", "1"]) == 0
    assert main(["train", "--resume", str(run / "state.prev.pt"), "--set", "optim.lr=1e30",
                 "--set", "train.log_every=1"]) == 1
    assert "non-finite at step 24" in caplog.text  # step 23 was taken, and logged
    assert f"the last checkpoint is {run / 'state.prev.pt'} (step 22)" in caplog.text
    assert files() == before

    caplog.clear()
    assert main(["train", "--resume", str(run / "state.prev.pt")]) == 0
    assert "going back to state.prev.pt (step 22); state.pt is replaced by this run's first save" in caplog.text
    again = torch.load(run / "state.pt", weights_only=True)
    assert again["step"] == 44 and again["model"].keys() == last["model"].keys()
    assert all(torch.equal(again["model"][k], last["model"][k]) for k in last["model"])
    assert torch.load(run / "state.prev.pt", weights_only=True)["step"] == 22  # where this run started
    assert [r["step"] for r in read_metrics(run / "metrics.csv")] == [22, 44]  # epoch 2's row once

    capsys.readouterr()
    assert main(["train", "--resume", str(run / "recipe.yaml")]) == 2  # another file of the run
    assert "a file; --resume takes a run directory (or its state.prev.pt" in capsys.readouterr().err
    assert main(["train", "--recipe", str(run / "recipe.yaml"), "--out", str(run)]) == 2  # a fresh run over it
    assert f"--out {run} already holds a run; continue it with --resume {run} or" in capsys.readouterr().err
    os.rename(run / "state.pt", run / "moved.pt")
    assert main(["train", "--recipe", str(run / "recipe.yaml"), "--out", str(run)]) == 2
    assert f"continue it with --resume {run / 'state.prev.pt'} or" in capsys.readouterr().err
    assert main(["train", "--resume", str(run)]) == 2
    assert f"no state.pt (removed?); --resume {run / 'state.prev.pt'} continues from the save before it" in \
        capsys.readouterr().err
    os.unlink(run / "state.prev.pt")
    assert main(["train", "--resume", str(run / "state.prev.pt")]) == 2
    assert "state.prev.pt: no such file (a run keeps the state before the last from its second save on)" in \
        capsys.readouterr().err


def test_a_full_disk_gives_up_the_previous_state_not_the_run(tmp_path, monkeypatch, caplog):
    """No room for a third state: state.prev.pt is removed and the save goes through; later saves keep one state."""
    import errno

    from vitkit.train import trainer

    real, calls = trainer.atomic_save, []

    def full_at_step_66(obj, path, before=None):  # state.pt (44) and state.prev.pt (22) fill the disk
        calls.append((obj["step"], before is not None))
        if obj["step"] == 66 and len([c for c in calls if c[0] == 66]) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path, before=before)

    monkeypatch.setattr(trainer, "atomic_save", full_at_step_66)
    train_ok("--recipe", str(write_recipe(tmp_path / "r.yaml", train={"epochs": 4})), "--out", str(tmp_path / "run"))
    assert calls == [(22, True), (44, True), (66, True), (66, False), (88, False)]
    assert "disk full: " in caplog.text and "state.prev.pt removed to make room for the new checkpoint" in caplog.text
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=True)["step"] == 88
    assert not (tmp_path / "run" / "state.prev.pt").exists()


def test_a_full_disk_while_exporting_the_weights_gives_up_the_previous_state_too(tmp_path, monkeypatch, caplog):
    """The weights are written first: on a full disk their export is what fails, and safetensors says ENOSPC
    in its own error type ("... (os error 28)")."""
    import safetensors.torch
    from safetensors import SafetensorError

    import vitkit.weights.vitkit_format as fmt

    real, failed = safetensors.torch.save_file, []

    def full_once_at_step_66(tensors, path, metadata=None):
        if '"step": 66' in metadata["config"] and not failed:
            failed.append(path)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full_once_at_step_66)
    train_ok("--recipe", str(write_recipe(tmp_path / "r.yaml", train={"epochs": 4})), "--out", str(tmp_path / "run"))
    assert len(failed) == 1 and "state.prev.pt removed to make room for the new checkpoint" in caplog.text
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=True)["step"] == 88
    assert vitkit.load_model(tmp_path / "run" / "last.safetensors") is not None
    with pytest.raises(OSError) as e:  # the number survives the one-line OSError save_model raises
        failed.clear()
        fmt.save(vitkit.load_model(tmp_path / "run" / "last.safetensors"), tmp_path / "x.safetensors",
                 {"train": {"step": 66}})
    assert e.value.errno == 28 and str(e.value).startswith(f"{tmp_path / 'x.safetensors'}: cannot write (No space left")


def test_previous_state_without_hard_links(tmp_path, monkeypatch):
    """On a file system without hard links the previous state is a copy."""
    from vitkit.train import rundir

    (tmp_path / "state.pt").write_bytes(b"step 1")
    rundir.keep_previous(tmp_path)  # a hard link
    assert (tmp_path / "state.prev.pt").read_bytes() == b"step 1"
    assert os.stat(tmp_path / "state.prev.pt").st_ino == os.stat(tmp_path / "state.pt").st_ino

    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(rundir.os, "link", no_links)
    os.unlink(tmp_path / "state.pt")
    (tmp_path / "state.pt").write_bytes(b"step 2")
    rundir.keep_previous(tmp_path)
    assert (tmp_path / "state.prev.pt").read_bytes() == b"step 2" and sorted(os.listdir(tmp_path)) == \
        ["state.prev.pt", "state.pt"]  # no temporary file left


def test_nonfinite_loss_before_any_checkpoint(tmp_path, caplog):
    code = main(["train", "--recipe", str(write_recipe(tmp_path / "r.yaml")), "--set", "optim.lr=1e30",
                 "--out", str(tmp_path / "run")])
    assert code == 1 and "non-finite at step 2" in caplog.text and "no checkpoint was written yet" in caplog.text
    assert not (tmp_path / "run" / "state.pt").exists()


def test_resume_extends_a_finished_run(tiny_run, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    r = yaml.safe_load((run / "recipe.yaml").read_text())
    train_ok("--resume", str(run), "--epochs", "3")
    lrs = [lr_at(44, total, r["schedule"], r["optim"]["lr"]) for total in (66, 44)]  # the cosine stretched
    assert lrs[0] > 10 * lrs[1] and (f"the schedule now ends at step 66 instead of 44, so the learning rate at step "
                                     f"44 is {lrs[0]:.3g} instead of {lrs[1]:.3g}") in caplog.text
    assert [r["epoch"] for r in read_metrics(run / "metrics.csv")] == [1.0, 2.0, 3.0]
    assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["epochs"] == 3  # the recipe now in force
    assert torch.load(run / "state.pt", weights_only=True)["step"] == 3 * 22


def test_resume_keeps_the_runs_model_and_split(tiny_run, tmp_path, capsys, caplog):
    """What the state was trained with cannot change; a finished run says how to go on; a fine-tuning run
    resumes without the checkpoint it started from."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for args, said in ((["--batch-size", "32"], "data.batch_size (--batch-size) cannot change in a run (64 -> 32)"),
                       (["--val-split", "0.5"], "data.val_split (--val-split) cannot change in a run (0.2 -> 0.5)"),
                       (["--img-size", "16"], "model.img_size (--img-size) cannot change in a run (8 -> 16)")):
        capsys.readouterr()
        assert main(["train", "--resume", str(run), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert said in err and "--weights" in err and "\n" not in err, err
    caplog.clear()
    train_ok("--resume", str(run))
    assert "the run is at step 44 of 44 already" in caplog.text and "raise --epochs" in caplog.text

    start = tmp_path / "start.safetensors"  # fine-tune from a file, then lose it: the run has its own model
    shutil.copy(tiny_run / "best.safetensors", start)
    recipe = write_recipe(tmp_path / "ft.yaml", train={"epochs": 1, "threads": 1})
    train_ok("--recipe", str(recipe), "--weights", str(start), "--out", str(tmp_path / "ft"))
    start.unlink()
    train_ok("--resume", str(tmp_path / "ft"), "--epochs", "2")
    assert torch.load(tmp_path / "ft" / "state.pt", weights_only=True)["step"] == 2 * 22


def test_finetune_from_a_vitkit_checkpoint_keeps_its_architecture_and_inputs(tiny_run, caplog):
    """A recipe written for another model (finetune.yaml names ViT-B/16) still fine-tunes a vitkit checkpoint
    as it is, and its input normalisation stays the one its weights learned with."""
    recipe = R.load(ROOT / "recipes" / "finetune.yaml", {"data.path": "digits", "model.img_size": 16,
                                                           "model.weights": str(tiny_run / "best.safetensors")})
    assert recipe["model"]["name"] == "ViT-B/16" and recipe["model"]["mean"] is None
    model = build_model({**recipe["model"], "mean": [0.1, 0.2, 0.3]}, [str(i) for i in range(10)])
    assert model.cfg.width == 32 and model.cfg.img_size == (16, 16) and not model.head.weight.any()
    assert tuple(model.preprocess["mean"]) == (0.5, 0.5, 0.5)  # the checkpoint's, not the recipe's 0.1, 0.2, 0.3
    assert "model.name ViT-B/16 not used" in caplog.text and "keeps its own input normalisation" in caplog.text
    assert caplog.text.count("head replaced") == 1


def test_finetune_from_weights_that_say_their_architecture_or_not(tmp_path, caplog):
    """A transformers folder or timm weights with timm's config.json build what they say, whatever model.name
    (finetune.yaml's ViT-B/16) says; a plain timm file keeps the recipe's mean/std where it states none, and an
    unnamed head of as many classes is kept, said; a misfit's hint names the recipe key."""
    timm = pytest.importorskip("timm")
    from timm.models._hub import save_for_hf

    from weight_peers import hf_vit

    hf_vit("ViT-Ti/16", id2label={i: f"c{i}" for i in range(10)}).save_pretrained(tmp_path / "hf")
    torch.manual_seed(0)
    peer = timm.create_model("vit_tiny_patch16_224", patch_size=8, img_size=32, depth=1, num_classes=3)
    save_for_hf(peer, tmp_path / "timm", safe_serialization=True)
    finetune = {"data.path": "digits", "model.img_size": 16}
    for weights, width in ((tmp_path / "hf", 192), (tmp_path / "timm" / "model.safetensors", 192)):
        recipe = R.load(ROOT / "recipes" / "finetune.yaml", {**finetune, "model.weights": str(weights)})
        caplog.clear()
        model = build_model(recipe["model"], ["a", "b", "c"])
        assert model.cfg.width == width and model.cfg.depth == 1 and not model.head.weight.any()
        assert "model.name ViT-B/16 not used" in caplog.text and "class names do not fit" not in caplog.text
    torch.save(peer.state_dict(), tmp_path / "plain.pth")  # no config.json: states no mean or std
    recipe = R.load(None, {"data.path": "digits", "model.name": "vit_tiny_patch16_224", "model.depth": 1,
                           "model.patch_size": 8, "model.img_size": 32, "model.mean": [0.1, 0.2, 0.3],
                           "model.weights": str(tmp_path / "plain.pth")})
    caplog.clear()
    model = build_model(recipe["model"], ["a", "b", "c"])
    assert tuple(model.preprocess["mean"]) == (0.1, 0.2, 0.3) and "keeps its own" not in caplog.text
    assert torch.equal(model.head.weight, peer.head.weight)  # as many classes and none named: kept, and said
    assert "its 3-class head is kept, its classes taken as the data's in order (a, b, c)" in caplog.text
    with pytest.raises(vitkit.CheckpointError, match=r"--set model\.patch_size=8 on the command line\)$"):
        build_model({**recipe["model"], "patch_size": None}, ["a", "b", "c"])
    # a config.json naming a timm model vitkit has no name for: --model is the architecture
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    (tmp_path / "timm" / "config.json").write_text(json.dumps({**config, "architecture": "vit_base_patch16_224_miil"}))
    with pytest.raises(vitkit.CheckpointError, match="names vit_base_patch16_224_miil, a timm model vitkit has no"):
        vitkit.load_model(tmp_path / "timm" / "model.safetensors")
    recipe = R.load(None, {"data.path": "digits", "model.name": "vit_tiny_patch16_224", "model.depth": 1,
                           "model.patch_size": 8, "model.img_size": 32,
                           "model.weights": str(tmp_path / "timm" / "model.safetensors")})
    assert build_model(recipe["model"], ["a", "b", "c"]).cfg.width == 192
    torch.save(timm.create_model("vit_tiny_patch16_224", depth=1, in_chans=1).state_dict(), tmp_path / "gray.pth")
    with pytest.raises(R.RecipeError, match=r"gray\.pth: the model takes 1-channel input, and images are read as RGB"):
        build_model({**recipe["model"], "weights": str(tmp_path / "gray.pth"), "patch_size": None,
                     "img_size": None}, ["a", "b", "c"])


def test_recipe_weights_a_download_or_a_runs_state(tmp_path, http_root, tiny_run):
    """model.weights may be an https:// URL or hf-hub: name (downloaded when the recipe is checked, not refused as
    a missing file); a run's state.pt gets a pointer to its weights."""
    root, base, _ = http_root
    shutil.copy(tiny_run / "best.safetensors", root / "tiny.safetensors")
    recipe = R.load(None, {"data.path": "digits", "model.weights": f"{base}/tiny.safetensors"})
    assert build_model(recipe["model"], [str(i) for i in range(10)]).cfg.width == 32
    with pytest.raises(R.RecipeError, match=r"state\.pt: a run's training state; give the run's best\.safetensors"):
        R.load(None, {"data.path": "digits", "model.weights": str(tiny_run / "state.pt")})


def test_lr_schedule():
    s = {"name": "cosine", "warmup_steps": 10, "warmup_fraction": 0.0, "min_lr": 0.0}
    assert [lr_at(i, 110, s, 1.0) for i in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_at(59, 110, s, 1.0) == pytest.approx(0.5) and lr_at(109, 110, s, 1.0) == pytest.approx(0.0)
    lin = {**s, "name": "linear", "warmup_steps": 0, "warmup_fraction": 0.1, "min_lr": 0.1}
    assert lr_at(9, 100, lin, 1.0) == pytest.approx(1.0) and lr_at(54, 100, lin, 1.0) == pytest.approx(0.55)


def test_a_budget_runs_warm_up_goes_on_from_where_the_clock_left_it():
    from vitkit.train.trainer import warmup_by_clock

    s = {"name": "cosine", "warmup_steps": 0, "warmup_fraction": 0.1, "min_lr": 0.0}
    assert warmup_by_clock(5, 30.0, 600.0, s, 1.0, 10**6) == pytest.approx(0.5)  # 30 s of the 60 s warm-up
    assert warmup_by_clock(5, 90.0, 600.0, s, 1.0, 10**6) == 1.0  # never past the peak
    assert warmup_by_clock(5, 30.0, 600.0, {**s, "warmup_steps": 100}, 1.0, 10**6) == pytest.approx(0.06)  # longer
    # bounded by the step limit's schedule, which no fit exceeds: 66 steps (3 epochs) warm up in 7 at the slowest,
    # and past that the limit's decay is the slowest, to min_lr at its last step when no fit came before it
    assert warmup_by_clock(5, 1.0, 300.0, s, 1.0, 66) == pytest.approx(6 / 7)
    assert warmup_by_clock(40, 1.0, 300.0, s, 1.0, 66) == lr_at(40, 66, s, 1.0) < 0.5
    assert warmup_by_clock(21, 1.0, 300.0, s, 1.0, 22) == 0.0
    # fitted at step 23 with the clock's lr 0.2, 100 warm-up steps of 1000: linear from there to the peak at 99
    ramp = [lr_at(i, 1000, s, 1.0, (23, 0.2)) for i in range(23, 101)]
    assert ramp[0] == pytest.approx(0.2 + 0.8 / 77) and ramp[-2] == pytest.approx(1.0)
    assert np.diff(ramp[:-1]) == pytest.approx(0.8 / 77)
    # later fits move the warm-up's end and the decay's; the last step still runs at min_lr
    assert lr_at(299, 300, s, 1.0, (23, 0.2)) == pytest.approx(0.0) and lr_at(19, 20, s, 1.0, (23, 0.2)) == 0.0
    # without a start: the plain warm-up, to the bit (resumed runs of earlier versions compare their weights)
    assert [lr_at(i, 1000, s, 0.003, None) for i in range(100)] == [0.003 * (i + 1) / 100 for i in range(100)]


@pytest.mark.parametrize("name", ["cosine", "linear"])
@pytest.mark.parametrize("total,warmup", [(100, 10), (4, 10000), (2, 0)])
def test_lr_schedule_ends_at_min_lr_on_the_last_step(name, total, warmup):
    """The last step that runs (total - 1) trains at min_lr, as the official vit_jax schedule does; also when the
    warm-up is longer than the run (a short --set train.max_steps with recipes/pretrain.yaml's 10k warm-up)."""
    s = {"name": name, "warmup_steps": warmup, "warmup_fraction": 0.0, "min_lr": 1e-5}
    assert lr_at(total - 1, total, s, 1.0) == pytest.approx(1e-5)


def test_ema_of_a_model_with_batchnorm():
    """The recipe's hybrid models have BatchNorm, whose step counter is an integer buffer: averaged weights,
    copied counter (it used to crash the first update)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).train()
    ema = ema_model(model, decay=0.5)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model(torch.randn(2, 3, 8, 8))  # one batch: running statistics move, num_batches_tracked becomes 1
    ema.update_parameters(model)  # first update: the average starts as a copy
    ema.update_parameters(model)  # second: decay min(0.5, 2/11) -> 2/11 of the average, 9/11 of the model
    assert torch.allclose(ema.module[0].weight, start + 1.0)
    with torch.no_grad():
        model[0].weight.add_(11.0)
    model(torch.randn(2, 3, 8, 8))
    ema.update_parameters(model)  # third: decay min(0.5, 3/12) = 1/4
    assert torch.allclose(ema.module[0].weight, start + 1.0 + 11.0 * 0.75)
    assert ema.module[1].num_batches_tracked.item() == 2 and ema.module[1].num_batches_tracked.dtype == torch.long


@pytest.mark.parametrize("optim", [{"name": "adamw", "lr": 1e-2, "betas": [0.9, 0.99], "weight_decay": 0.5},
                                   {"name": "sgd", "lr": 1e-2, "momentum": 0.9, "nesterov": True, "weight_decay": 0.0}])
def test_optimizer_is_fused_and_updates_like_torchs_default(optim):
    """make_optimizer picks the fused kernel; its updates (weight decay on matrices only) match torch's default
    per-tensor loop given the same parameter groups."""
    fields = R.load(None, {"data.path": "digits", **{f"model.{k}": v for k, v in TINY["model"].items()}})["model"]
    torch.manual_seed(0)
    model = build_model(fields, ["a", "b", "c"])
    start = {k: v.clone() for k, v in model.state_dict().items()}
    reference = build_model(fields, ["a", "b", "c"])
    reference.load_state_dict(start)
    ours = make_optimizer(model, optim)
    assert ours.defaults["fused"]
    decayed = {n for n, p in model.named_parameters() if any(p is q for q in ours.param_groups[0]["params"])}
    assert decayed == {n for n, p in model.named_parameters() if p.ndim > 1 and n != "pos_embed"}
    twin = dict(zip(model.parameters(), reference.parameters()))
    groups = [{"params": [twin[p] for p in g["params"]], "weight_decay": g["weight_decay"]} for g in ours.param_groups]
    kw = {k: tuple(v) if k == "betas" else v for k, v in optim.items() if k in ("lr", "betas", "momentum", "nesterov")}
    theirs = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[optim["name"]](groups, foreach=False, **kw)
    assert [g["weight_decay"] for g in theirs.param_groups] == [optim["weight_decay"], 0.0]
    x, y = torch.randn(4, 3, *model.cfg.img_size), torch.tensor([0, 1, 2, 0])
    for _ in range(3):
        for m, opt in ((model, ours), (reference, theirs)):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):  # 5e-5: Adam turns the rounding
        # noise of a zero gradient (the attention's key bias) into steps of up to lr; elsewhere they agree to 1e-7
        assert torch.allclose(p, q, atol=5e-5), name
    assert not torch.equal(model.head.weight, start["head.weight"])  # the steps did move the weights


def test_attention_kernel_choice_and_its_effect():
    cpu = torch.device("cpu")
    assert pick_attention("auto", cpu, "bf16", 65) == "math" and pick_attention("auto", cpu, "fp16", 160) == "math"
    assert pick_attention("auto", cpu, "bf16", 197) is None  # ViT-B/16 at 224 px: the fused kernel is faster
    assert pick_attention("auto", cpu, "none", 65) is None and pick_attention("auto", cpu, "auto", 65) is None
    assert pick_attention("auto", torch.device("cuda"), "bf16", 65) is None
    assert pick_attention("default", cpu, "bf16", 65) is None and pick_attention("flash", cpu, "none", 65) == "flash"
    model = vitkit.create_model("ViT-Ti/16", img_size=32, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)
        with attention_kernel("math"):  # pinned: the same numbers by another kernel
            torch.testing.assert_close(model(x), fused, atol=1e-5, rtol=1e-4)


# --- data sources -----------------------------------------------------------------------------------------
def test_folder_archive_and_corrupt_images(tmp_path, caplog):
    """train/ + val/ folders, the same as .tar.gz, a corrupt file skipped and listed; --val-split stratified."""
    digit_images(tmp_path / "ds" / "train", ["1", "2", "5"], per_class=40)
    digit_images(tmp_path / "ds" / "val", ["1", "2", "5"], per_class=10, offset=40)
    (tmp_path / "ds" / "train" / "2" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with tarfile.open(tmp_path / "ds.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "ds", arcname="ds")
    cache = str(tmp_path / "cache")
    folder = open_data(str(tmp_path / "ds"), cache_dir=cache)
    archive = open_data(str(tmp_path / "ds.tar.gz"), cache_dir=cache)
    for data in (folder, archive):
        assert data.class_names == ["1", "2", "5"] and (len(data.train), len(data.val)) == (120, 30)
        assert len(data.skipped) == 1 and "bad.jpg" in data.skipped[0]
        assert torch.equal(data.train.images, folder.train.images)  # decoded into the tensor cache
    assert archive.skipped[0].startswith(f"{tmp_path / 'ds.tar.gz'}:ds/train/2/bad.jpg: ")  # named in the archive
    both = open_data(str(tmp_path / "ds"), val_split=0.25, cache_dir=cache)  # the val/ folder wins over a split
    assert (len(both.train), len(both.val)) == (120, 30) and both.split["val_split"] == 0.0
    single = open_data(str(tmp_path / "ds" / "train"), val_split=0.25, split_seed=3, cache_dir=cache)
    val_labels = torch.tensor([single.train.dataset.labels[i] for i in single.val.indices])
    assert val_labels.bincount().tolist() == [10, 10, 10]  # stratified

    skipped = skipped_in_training(tmp_path, data={"path": str(tmp_path / "ds.tar.gz"), "batch_size": 20,
                                                  "cache_dir": cache, "val_split": 0.0})
    assert skipped == archive.skipped
    assert "1 unreadable images were skipped" in caplog.text


def skipped_in_training(tmp_path, **sections) -> list[str]:
    """Train one epoch; the unreadable images the training state lists."""
    recipe = write_recipe(tmp_path / "r.yaml", **sections, train={"epochs": 1})
    train_ok("--recipe", str(recipe), "--out", str(tmp_path / "run"))
    return torch.load(tmp_path / "run" / "state.pt", weights_only=True)["skipped"]


def test_files_decoded_on_demand_skip_corrupt(tmp_path):
    """Without preloading, a corrupt file is found while training: dropped from its batch, listed."""
    digit_images(tmp_path / "ds", ["0", "1"], per_class=20)
    (tmp_path / "ds" / "1" / "bad.png").write_bytes(b"not an image")
    skipped = skipped_in_training(tmp_path, data={"path": str(tmp_path / "ds"), "val_split": 0.25, "preload": False,
                                                  "batch_size": 10})
    assert len(skipped) == 1 and "bad.png" in skipped[0]


def digit_shards(folder, shards: int, per_shard: int | list[int]) -> str:
    """sklearn digits as WebDataset shards (png + cls), `per_shard` samples in each (or in each its own number);
    the brace pattern naming them."""
    import webdataset as wds
    from sklearn.datasets import load_digits

    d = load_digits()
    sizes = per_shard if isinstance(per_shard, list) else [per_shard] * shards
    ends = np.cumsum(sizes)
    for shard, (end, size) in enumerate(zip(ends, sizes)):
        with wds.TarWriter(str(folder / f"digits-{shard:03d}.tar")) as sink:
            for i in range(end - size, end):
                px = np.rint(d.images[i] * (255 / 16)).astype(np.uint8)
                sink.write({"__key__": f"{i:05d}", "png": np.stack([px] * 3, -1), "cls": int(d.target[i])})
    return str(folder / f"digits-{{000..{shards - 1:03d}}}.tar")


def test_shards_cycle_when_a_rank_has_fewer(tmp_path):
    """9 shards for 2 processes: rank 1 reads 4 and must cycle them to give as many batches as rank 0 (5)."""
    import itertools

    stream = open_data(digit_shards(tmp_path, 9, 20)).train.configure(lambda im: im, 0, 0, rank=1, world=2,
                                                                       repeat=True)
    assert len(list(itertools.islice(iter(stream), 100))) == 100
    assert len(list(stream.configure(lambda im: im, 0, 0, rank=1, world=2, repeat=False))) == 80


@pytest.mark.parametrize("shards, per_shard", [(1, 200), (3, 100), (3, [300, 80, 20]), (4, 50)])
def test_shards_shared_out_so_each_sample_is_read_once_per_epoch(tmp_path, shards, per_shard):
    """Fewer shards than processes, shards that cannot be dealt evenly, or of very different sizes: the two ranks
    together read every sample once per epoch, about half each (with the training shuffle on)."""
    from collections import Counter

    stream = open_data(digit_shards(tmp_path, shards, per_shard)).train
    stream.shuffle_buffer = 50

    def read(rank, world):  # an image's bytes stand for it
        return [(x, y) for x, y in stream.configure(lambda im: hashlib.md5(im.tobytes()).hexdigest(), 7, 1,
                                                    rank=rank, world=world)]

    every = read(0, 1)
    assert len(every) == len(stream)
    ranks = [read(0, 2), read(1, 2)]
    assert Counter(ranks[0] + ranks[1]) == Counter(every)
    assert 0.4 * len(every) <= len(ranks[0]) <= 0.6 * len(every)


@pytest.mark.parametrize("world, workers, micro", [(1, 2, 16), (2, 2, 8), (2, 3, 5)])
def test_shard_epochs_read_no_sample_twice_with_loader_workers(tmp_path, world, workers, micro):
    """The DataLoader takes batches from its workers in turn: each worker keeps exactly the batches it will be
    asked for. (With every other sample per worker, 3 shards of 50 at batch 16 read 5 samples twice, 11 never.)"""
    from collections import Counter

    stream = open_data(digit_shards(tmp_path, 3, 50)).train
    steps = len(stream) // (micro * world)  # the trainer's steps per epoch, drop_last
    read = []
    for rank in range(world):
        ds = stream.configure(lambda im: hashlib.md5(im.tobytes()).hexdigest(), 7, 1, rank=rank, world=world,
                              repeat=True, batch=micro)
        loader = iter(torch.utils.data.DataLoader(ds, batch_size=micro, num_workers=workers, collate_fn=list))
        read += [x for _ in range(steps) for x, _ in next(loader)]
    assert len(read) == steps * micro * world and max(Counter(read).values()) == 1


def test_webdataset_shards(tmp_path, capsys):
    spec = digit_shards(tmp_path, 2, 300)
    data = open_data(spec)
    assert len(data.train) == 600 and data.class_names == [str(i) for i in range(10)]
    one = tmp_path / "digits-000.tar"  # one shard named without a brace range reads as an ImageFolder archive
    assert main(["train", "--recipe", str(write_recipe(tmp_path / "one.yaml")), "--data", str(one)]) == 2
    err = capsys.readouterr().err
    assert f"{one}: no class folders" in err and "it looks like one WebDataset shard" in err, err
    run = tmp_path / "run"
    # TINY's val_split 0.2 is unused: the val shards are the validation set
    recipe = write_recipe(tmp_path / "r.yaml", data={"path": spec, "val": spec, "batch_size": 50},
                          train={"epochs": 1})
    train_ok("--recipe", str(recipe), "--out", str(run))
    assert read_metrics(run / "metrics.csv")[-1]["step"] == 12


# --- bad inputs: one clear line, exit code 2, nothing started ----------------------------------------------
@pytest.mark.parametrize("args, expected", [
    (["--data", "/no/such/folder"], "/no/such/folder: no such file or directory"),
    (["--set", "optim.lr=-1"], "optim.lr must be > 0"),
    (["--set", "optim.lrr=0.1"], "did you mean optim.lr?"),
    (["--set", "augment.crop=zoom"], "augment.crop must be one of"),
    (["--set", "optim.lr=-1", "--set", "train.epochs=0"], "train.epochs must be >= 1"),  # all problems at once
    (["--set", "optim"], "expected SECTION.KEY=VALUE"),
    (["--set", "optim.accum_steps=3"], "not divisible by optim.accum_steps"),
    (["--batch-size", "5000"], "larger than the 1438 training images"),
    (["--model", "ViT-Q/3"], "unknown model"),
    (["--weights", "/no/weights.safetensors"], "no such file"),
    (["--recipe", "/no/recipe.yaml"], "/no/recipe.yaml: no such file"),
    (["--resume", "/tmp"], "not a run directory"),
    (["--img-size", "7"], "model: img_size 7x7 is not a multiple of the patch size 2"),
    (["--weights", str(ROOT / "zoo" / "cifar10-vit.safetensors"), "--img-size", "30"],
     "img_size 30x30 is not a multiple of the patch size 8 (the stem's downsampling included)"),
    (["--weights", str(ROOT / "README.md")],
     "README.md: does not say its architecture, so set model.name too (--model)"),
    (["--device", "tpu7"], "train.device (--device) 'tpu7' is not a device name"),
    (["--device", "cuda:99"], "train.device (--device) 'cuda:99': this machine has"),
    (["--data", str(ROOT / "README.md")], "README.md: not a directory or a .tar/.tar.gz archive"),
    (["--data", "/x/shards-{000..009}.tar", "--val-split", "0.1"], "10 of 10 shards missing, e.g. /x/shards-000.tar"),
    (["--val-split", "0.0001"], "digits: a held-out fraction of 0.0001 (--val-split, data.val_split) is no image"),
])
def test_bad_inputs_one_line_error(tmp_path, capsys, args, expected):
    recipe = write_recipe(tmp_path / "r.yaml")
    args = args if "--recipe" in args or "--resume" in args else ["--recipe", str(recipe), *args]
    capsys.readouterr()
    assert main(["train", *args, *([] if "--resume" in args else ["--out", str(tmp_path / "run")])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitkit train: error:") and "\n" not in err and expected in err, err
    assert not (tmp_path / "run").exists()


def test_empty_class_folder_and_existing_run(tiny_run, tmp_path, capsys):
    digit_images(tmp_path / "ds", ["0", "1"], per_class=5)
    (tmp_path / "ds" / "2").mkdir()
    recipe = write_recipe(tmp_path / "r.yaml")
    digit_images(tmp_path / "ds2", ["0", "1"], per_class=5)
    (tmp_path / "ds2" / "2").mkdir()
    (tmp_path / "ds2" / "2" / "x.png").write_bytes(b"not an image")
    with tarfile.open(tmp_path / "ds2.tar", "w") as tar:
        tar.add(tmp_path / "ds2", arcname="train")
    for args, expected in ((["--data", str(tmp_path / "ds")], "empty class folder"),
                           (["--data", str(tmp_path / "ds2")],
                            f"{tmp_path / 'ds2' / '2'}: none of its images is readable"),
                           # decoded on demand (large images are): still caught before any work
                           (["--data", str(tmp_path / "ds2"), "--set", "data.preload=false"],
                            f"{tmp_path / 'ds2' / '2'}: none of its images is readable"),
                           (["--data", str(tmp_path / "ds2.tar"), "--set", "data.preload=false"],
                            f"{tmp_path / 'ds2.tar'}:train/2: none of its images is readable"),
                           (["--out", str(tiny_run)], "already holds a run"),
                           (["--out", str(recipe)], "is a file, not a directory"),
                           (["--out", str(recipe / "run")], f"{recipe} is a file, not a directory")):
        capsys.readouterr()
        assert main(["train", "--recipe", str(recipe), "--out", str(tmp_path / "x"), *args]) == 2
        assert expected in capsys.readouterr().err


def test_recipes_in_repo_are_valid():
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        text = path.read_text()
        assert text.startswith("#"), f"{path.name}: say where its values come from"
        R.load(path, {"data.path": "digits"})


def test_overrides_and_print_recipe(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml")
    capsys.readouterr()
    assert main(["train", "--recipe", str(recipe), "--lr", "0.5", "--set", "augment.scale=[0.5, 1]",
                 "--set", "train.ema_decay=0.99", "--epochs", "7", "--print-recipe"]) == 0
    r = yaml.safe_load(capsys.readouterr().out)
    assert r["optim"]["lr"] == 0.5 and r["augment"]["scale"] == [0.5, 1] and r["train"]["ema_decay"] == 0.99
    assert r["train"]["epochs"] == 7 and r["model"] == {**R.defaults()["model"], **TINY["model"]}


def test_recipe_from_a_checkpoint(tiny_run, tmp_path, capsys):
    """--recipe CHECKPOINT trains again with the recipe the checkpoint stores (flags still override it), and
    gives the same weights as the run that wrote it."""
    capsys.readouterr()
    assert main(["train", "--recipe", str(tiny_run / "best.safetensors"), "--epochs", "9", "--print-recipe"]) == 0
    r = yaml.safe_load(capsys.readouterr().out)
    assert r == {**(saved := yaml.safe_load((tiny_run / "recipe.yaml").read_text())),
                 "train": {**saved["train"], "epochs": 9}} and saved["train"]["epochs"] != 9
    # and training again from it reproduces the run: the same recipe and seed give the same weights on CPU
    train_ok("--recipe", str(tiny_run / "best.safetensors"), "--out", str(tmp_path / "again"))
    before, again = (vitkit.load_model(run / "last.safetensors").state_dict() for run in (tiny_run, tmp_path / "again"))
    assert before.keys() == again.keys() and all(torch.equal(before[k], again[k]) for k in before)
    plain = tmp_path / "plain.safetensors"  # a vitkit checkpoint not written by `vitkit train`: no recipe
    vitkit.save_model(vitkit.load_model(tiny_run / "best.safetensors"), plain)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    for bad, reason in ((plain, "holds no recipe"), (junk, "not a readable safetensors file")):
        assert main(["train", "--recipe", str(bad), "--print-recipe"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(bad) in err and reason in err, err


def test_loader_workers_do_not_change_the_result(tmp_path):
    """Augmentation draws are seeded per (seed, epoch, image): 0 or 2 loader processes train the same weights."""
    weights = []
    for workers in (0, 2):
        recipe = write_recipe(tmp_path / f"r{workers}.yaml", data={"num_workers": workers},
                              augment={"crop": "pad", "padding": 1, "auto_augment": "trivialaugment"},
                              train={"epochs": 1})
        train_ok("--recipe", str(recipe), "--out", str(tmp_path / f"run{workers}"))
        weights.append(vitkit.load_model(tmp_path / f"run{workers}" / "last.safetensors").state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_grad_checkpointing_trains_the_same_weights(tmp_path, monkeypatch):
    """train.grad_checkpointing recomputes activations (the same dropout and stochastic-depth draws) instead of
    keeping them: the same weights after an epoch."""
    weights, calls, checkpoint = [], [], torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **kw: calls.append(1) or checkpoint(*a, **kw))
    for flag in (False, True):
        recipe = write_recipe(tmp_path / f"r{flag}.yaml", model={"drop_path": 0.2, "dropout": 0.1},
                              train={"epochs": 1, "grad_checkpointing": flag})
        train_ok("--recipe", str(recipe), "--out", str(tmp_path / f"run{flag}"))
        weights.append(vitkit.load_model(tmp_path / f"run{flag}" / "last.safetensors").state_dict())
        assert bool(calls) == flag  # every block of every training step, only when asked
    worst = max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0])
    assert worst < 1e-6, f"largest difference: {worst:.2e}"


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    """optim.accum_steps=4 (4 micro-batches of 16) takes the same optimizer steps as batches of 64 at once
    (SGD: Adam would magnify the rounding differences in near-zero gradients step after step)."""
    weights = []
    for accum in (1, 4):
        recipe = write_recipe(tmp_path / f"r{accum}.yaml", optim={"name": "sgd", "lr": 0.1, "accum_steps": accum},
                              train={"epochs": 3})
        train_ok("--recipe", str(recipe), "--out", str(tmp_path / f"run{accum}"))
        weights.append(vitkit.load_model(tmp_path / f"run{accum}" / "last.safetensors").state_dict())
    worst = max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0])
    assert worst < 2e-5, f"largest difference: {worst:.2e}"  # float sums in another order, nothing more
    losses = [row["train_loss"] for row in read_metrics(tmp_path / "run4" / "metrics.csv")]
    assert losses[-1] < losses[0] - 0.1  # and it did train


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_follows_the_cpu(monkeypatch, caplog, native):
    """train.amp=auto: bf16 only on CPUs that compute it natively (AVX-512 bf16 / AMX), fp32 on the others;
    asking for bf16 on one without it works but warns."""
    from vitkit.train.evaluate import training_precision

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cpu = torch.device("cpu")
    assert training_precision(cpu, "auto") == ("bf16" if native else "none")
    assert training_precision(cpu, "none") == "none"
    caplog.clear()
    assert training_precision(cpu, "bf16") == "bf16"
    assert ("without native bf16" in caplog.text) != native


def test_batched_shift_flip_draws_the_per_image_augmentation():
    """The batched path for in-memory images gives what train_transform gives: each output is the image
    shifted within the zero padding and maybe mirrored, normalised; every shift occurs, flips at the set rate;
    an image's draws follow its (epoch, index) key, not the batch it is in."""
    from vitkit.data.augment import BatchShiftFlip, train_transform
    from vitkit.data.datasets import Transformed, TensorImages

    images = torch.randint(0, 256, (400, 3, 12, 12), dtype=torch.uint8)
    ds = TensorImages(images, torch.arange(400) % 10)
    pre = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.3, 0.25], "interpolation": "bilinear"}
    aug = {**R.defaults()["augment"], "crop": "pad", "padding": 2, "hflip": 0.5}
    batched = BatchShiftFlip.applies(aug, ds, (12, 12), pre, seed=7)
    x, y, skipped = batched.collate([batched[(3, i)] for i in range(400)])
    assert x.shape == (400, 3, 12, 12) and torch.equal(y, ds.labels) and skipped == []

    mean, std = torch.tensor(pre["mean"]).view(3, 1, 1), torch.tensor(pre["std"]).view(3, 1, 1)
    seen, flips = set(), 0
    for i in range(400):
        padded = F.pad(images[i], (2, 2, 2, 2)).float() / 255
        matches = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (0, 1)
                   if torch.allclose(x[i], ((padded[:, dy:dy + 12, dx:dx + 12].flip(-1) if f else
                                             padded[:, dy:dy + 12, dx:dx + 12]) - mean) / std, atol=1e-5)]
        assert len(matches) == 1, i
        seen.add(matches[0][:2])
        flips += matches[0][2]
    assert len(seen) == 25 and 160 < flips < 240

    again, _, _ = batched.collate([batched[(3, i)] for i in (399, 5, 17)])  # other batch, same keys
    assert torch.equal(again, x[[399, 5, 17]])
    other_epoch, _, _ = batched.collate([batched[(4, i)] for i in range(400)])
    assert (other_epoch - x).abs().amax(dim=(1, 2, 3)).gt(0).float().mean() > 0.8

    plain = {**aug, "padding": 0, "hflip": 0.0}  # no draws: the same numbers as torchvision's pipeline
    x0, _, _ = BatchShiftFlip.applies(plain, ds, (12, 12), pre, 0).collate([((0, i), *ds[i]) for i in range(8)])
    ref = Transformed(ds, train_transform(plain, (12, 12), pre))
    assert torch.allclose(x0, torch.stack([ref[i][0] for i in range(8)]), atol=1e-6)

    for change in ({"crop": "random_resized"}, {"auto_augment": "trivialaugment"}, {"random_erasing": 0.25}):
        assert BatchShiftFlip.applies({**aug, **change}, ds, (12, 12), pre, 0) is None
    assert BatchShiftFlip.applies(aug, ds, (16, 16), pre, 0) is None  # images need resizing first


def test_freed_memory_is_kept_for_the_next_step():
    """`vitkit train` stops glibc from unmapping large freed blocks: re-allocating a 64 MB activation then
    reuses its pages instead of page-faulting 16k fresh ones in (counted in a fresh process each way)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc malloc settings")
    probe = ("import resource, sys, torch\n"
             "from vitkit.train.cli import keep_freed_memory\n"
             "assert sys.argv[1] == 'default' or keep_freed_memory()\n"
             "for _ in range(2):\n"
             "    torch.ones(16 << 20).sum()\n"
             "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
             "for _ in range(10):\n"
             "    torch.ones(16 << 20).sum()  # 64 MB, over glibc's largest mmap threshold (32 MB)\n"
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    faults = {mode: int(subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("default", "kept")}
    assert faults["default"] > 10 * (16 << 20) * 4 // 4096 * 0.9  # every 64 MB block faulted in again
    assert faults["kept"] < faults["default"] / 20


def test_distributed_errors_said_once_before_starting(tmp_path, monkeypatch, capsys):
    """Under torchrun every rank validates the same recipe: rank 0 reports, the others exit quietly."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(R.RecipeError, match="train.ema_decay is not supported with train.distributed=fsdp"):
        R.load(write_recipe(tmp_path / "r.yaml"), {"train.ema_decay": 0.99, "train.distributed": "fsdp"})
    for rank, said in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        capsys.readouterr()
        assert main(["train", "--recipe", str(tmp_path / "r.yaml"), "--lr", "-1"]) == 2
        assert ("optim.lr (--lr) must be > 0" in capsys.readouterr().err) == said


@pytest.mark.skipif(not (SHARED / "imagenet-samples").is_dir(), reason="../shared/data/imagenet-samples not present")
def test_eval_imagenet_folders_matched_by_wordnet_id(tmp_path, capsys):
    """An ImageNet-1k checkpoint without class names (timm's) on photos in WordNet-ID folders, as an ImageNet
    validation set is laid out: labels are the IDs' places in the sorted list of 1000; the loss checks them."""
    timm = pytest.importorskip("timm")
    photos = sorted((SHARED / "imagenet-samples").glob("*.JPEG"))[:6]
    for p in photos:
        (tmp_path / "val" / p.name.split("_")[0]).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, tmp_path / "val" / p.name.split("_")[0] / p.name)
    torch.manual_seed(0)
    peer = timm.create_model("vit_tiny_patch16_224").eval()
    torch.save(peer.state_dict(), tmp_path / "ti.pth")
    capsys.readouterr()
    assert main(["eval", "--data", str(tmp_path / "val"), "--weights", str(tmp_path / "ti.pth"), "--model",
                 "vit_tiny_patch16_224", "--json", "--workers", "0", "--out", str(tmp_path)]) == 0
    got = json.loads(capsys.readouterr().out)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=peer))
    wnids = (ROOT / "src" / "vitkit" / "data" / "imagenet_wnids.txt").read_text().split()
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in sorted(photos)])
    y = torch.tensor([wnids.index(p.name.split("_")[0]) for p in sorted(photos)])
    with torch.no_grad():
        loss = F.cross_entropy(peer(x), y).item()
    assert got["n"] == 6 and set(got["per_class"]) == {p.name.split("_")[0] for p in photos}
    assert got["loss"] == pytest.approx(loss, abs=1e-4)
    # one naming its classes in words (transformers' google/vit-base-patch16-224: "tench, Tinca tinca", ...)
    named = vitkit.create_model("vit_tiny_patch16_224", weights=tmp_path / "ti.pth")
    named.class_names = [f"class in words {i}" for i in range(1000)]
    vitkit.save_model(named, tmp_path / "named.safetensors")
    assert main(["eval", "--data", str(tmp_path / "val"), "--weights", str(tmp_path / "named.safetensors"), "--json",
                 "--workers", "0", "--out", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(loss, abs=1e-4)


# --- never lose a run: the run directory as the only source of truth ------------------------------------------
def test_stop_in_an_epochs_last_step_still_ends_that_epoch(tiny_run, tmp_path, monkeypatch):
    """SIGTERM arriving in the last step of epoch 1: the epoch is evaluated, logged and saved before stopping,
    and the resumed run ends with the uninterrupted run's weights."""
    forward, steps = vitkit.ViT.forward, []

    def counting(self, x):
        if self.training:
            steps.append(1)
            if len(steps) == 22:  # the last step of epoch 1 (1438 training images, 64 per step)
                os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, x)

    monkeypatch.setattr(vitkit.ViT, "forward", counting)
    run = tmp_path / "run"
    assert main(["train", "--recipe", str(write_recipe(tmp_path / "r.yaml")), "--out", str(run)]) == 128 + 15
    rows = read_metrics(run / "metrics.csv")
    assert [r["step"] for r in rows] == [22] and rows[0]["val_top1"] is not None
    monkeypatch.setattr(vitkit.ViT, "forward", forward)
    train_ok("--resume", str(run))
    for name in ("last.safetensors", "best.safetensors"):
        a, b = (vitkit.load_model(d / name).state_dict() for d in (run, tiny_run))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert [r["step"] for r in read_metrics(run / "metrics.csv")] == [22, 44]


def test_resume_trusts_the_state_and_guards_the_directory(tiny_run, tmp_path, capsys):
    import fcntl

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    recipe_text = (run / "recipe.yaml").read_text()
    (run / "recipe.yaml").write_text(recipe_text[:200])  # damaged: the state holds the recipe it was made with
    with open(run / "metrics.csv", "a") as f:  # a row a stopped run wrote after its last state
        f.write("3,66,0.001,0.5,0.9,,,,100,5\n")
    with open(run / ".lock", "a+") as holder:  # another process has the run
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        capsys.readouterr()
        assert main(["train", "--resume", str(run), "--epochs", "3"]) == 2
        assert "is in use by another `vitkit train`" in capsys.readouterr().err
    train_ok("--resume", str(run), "--epochs", "3")
    assert [r["step"] for r in read_metrics(run / "metrics.csv")] == [22, 44, 66]
    assert yaml.safe_load((run / "recipe.yaml").read_text()) == {**yaml.safe_load(recipe_text),
                                                                  "train": {**yaml.safe_load(recipe_text)["train"],
                                                                            "epochs": 3}}
    (run / "last.safetensors").write_bytes(b"damaged")  # an export is not needed: the state has the weights
    train_ok("--resume", str(run), "--epochs", "4")
    assert vitkit.load_model(run / "last.safetensors").cfg.width == 32
    (run / "state.pt").write_bytes((run / "state.pt").read_bytes()[:5000])  # truncated
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "state.pt is unreadable (truncated or damaged)" in err and "\n" not in err
    assert "state.prev.pt goes back" in err  # a readable one: pointed to
    (run / "state.prev.pt").write_bytes(b"hello\n")  # both damaged: no pointer to a state that cannot be read
    assert main(["train", "--resume", str(run), "--epochs", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("state.pt is unreadable (truncated or damaged); the run cannot continue from it")
    assert main(["train", "--resume", str(run / "state.prev.pt"), "--epochs", "5"]) == 2
    assert "state.prev.pt is unreadable (not a torch checkpoint: overwritten?)" in capsys.readouterr().err


def test_interrupted_state_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    from vitkit.train.trainer import atomic_save

    (tmp_path / "state.pt").write_bytes(b"previous")

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError):
        atomic_save({"step": 1}, tmp_path / "state.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"] and (tmp_path / "state.pt").read_bytes() == b"previous"


# --- every recipe value acts, and a resume keeps what it must ---------------------------------------------
def test_lr_schedule_decay_shapes():
    s = {"name": "cosine", "warmup_steps": 0, "warmup_fraction": 0.0, "min_lr": 0.0}
    # a quarter of the way (1-based progress 25/100): cosine 0.5 * (1 + cos(pi/4)) = 0.854, linear 0.75
    assert lr_at(24, 100, s, 1.0) == pytest.approx(0.5 * (1 + np.cos(np.pi / 4)))
    assert lr_at(24, 100, {**s, "name": "linear"}, 1.0) == pytest.approx(0.75)
    assert lr_at(24, 100, {**s, "name": "constant", "min_lr": 0.1}, 1.0) == 1.0


def test_tensorboard_logs_the_learning_rate_of_each_step(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tiny_run / "tensorboard"))
    events.Reload()
    r = yaml.safe_load((tiny_run / "recipe.yaml").read_text())
    logged = events.Scalars("train/lr")
    assert [e.step for e in logged] == [10, 20, 30, 40]  # train.log_every 10, 44 steps
    assert [e.value for e in logged] == pytest.approx([lr_at(e.step - 1, 44, r["schedule"], r["optim"]["lr"])
                                                       for e in logged], rel=1e-6)


def _first_step(tmp_path, name: str, **sections):
    """Train TINY for one optimizer step; (the start model, the trained model, the first batch (x, y), the run)."""
    recipe = write_recipe(tmp_path / f"{name}.yaml", **{"train": {"max_steps": 1}, **sections})
    run = tmp_path / name
    train_ok("--recipe", str(recipe), "--out", str(run))
    r = yaml.safe_load((run / "recipe.yaml").read_text())
    torch.manual_seed(r["train"]["seed"])  # as the trainer builds it
    start = build_model(r["model"], [str(i) for i in range(10)])
    from vitkit.train.trainer import EpochSampler

    data = open_data("digits", val_split=r["data"]["val_split"], split_seed=r["data"]["split_seed"])
    sampler = EpochSampler(data.train, 1, 0, r["train"]["seed"])
    sampler.set_epoch(0)
    idx = [i for _, i in sampler][: r["data"]["batch_size"]]
    x, y = digits_tensors()
    train_idx = torch.tensor(data.train.indices)[idx]
    return start, vitkit.load_model(run / "last.safetensors"), (x[train_idx], y[train_idx]), run


def test_gradient_clipping_bounds_the_step(tmp_path):
    """Plain SGD (no momentum, no decay), lr 1, gradients clipped to norm 1e-3: the first step moves the weights
    by exactly 1e-3 in all (the gradient itself is far larger)."""
    start, trained, _, _ = _first_step(tmp_path, "clip", optim={"name": "sgd", "lr": 1.0, "momentum": 0.0,
                                                                 "clip_grad_norm": 1e-3},
                                       schedule={"name": "constant"})
    a, b = start.state_dict(), trained.state_dict()
    moved = torch.cat([(b[k] - a[k]).flatten() for k in a]).norm().item()
    assert moved == pytest.approx(1e-3, rel=1e-3)


def test_label_smoothing_is_in_the_training_loss(tmp_path):
    """The first row's train_loss of a one-step run is the smoothed cross-entropy of the first batch at the
    start weights (computed here by hand), not the plain one."""
    start, _, (x, y), run = _first_step(tmp_path, "smooth", augment={"label_smoothing": 0.4})
    with torch.no_grad():
        logits = start(x)
    logged = read_metrics(run / "metrics.csv")[-1]["train_loss"]
    assert logged == pytest.approx(F.cross_entropy(logits, y, label_smoothing=0.4).item(), rel=1e-5)
    assert logged != pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)  # (0.04% apart at the start)


def test_ema_run_validates_and_exports_the_average(tmp_path):
    run = tmp_path / "run"
    train_ok("--recipe", str(write_recipe(tmp_path / "r.yaml", train={"epochs": 1, "ema_decay": 0.9})),
             "--out", str(run))
    state = torch.load(run / "state.pt", weights_only=True)
    best = vitkit.load_model(run / "best.safetensors").state_dict()
    ema = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
    assert all(torch.equal(best[k], ema[k]) for k in best)  # the average is what is exported ...
    assert not all(torch.equal(best[k], state["model"][k]) for k in best)  # ... not the raw weights
    meta = read_metadata(run / "best.safetensors")
    assert meta["train"]["ema"] is True
    x, y = digits_tensors()
    _, val_idx = stratified_split(y, 0.2, 0)
    averaged, raw = vitkit.load_model(run / "best.safetensors"), vitkit.load_model(run / "best.safetensors")
    raw.load_state_dict(state["model"])
    with torch.no_grad():
        losses = [F.cross_entropy(m(x[val_idx]), y[val_idx]).item() for m in (averaged, raw)]
    logged = read_metrics(run / "metrics.csv")[-1]["val_loss"]  # what training validated: the average
    assert logged == pytest.approx(losses[0], rel=1e-5) and logged != pytest.approx(losses[1], rel=1e-5)


def test_resumed_epoch_logs_the_uninterrupted_runs_train_loss(tiny_run, tmp_path, monkeypatch):
    forward, steps = vitkit.ViT.forward, []

    def counting(self, x):
        if self.training:
            steps.append(1)
            if len(steps) == 30:  # in the middle of epoch 2 (22 steps each)
                os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, x)

    monkeypatch.setattr(vitkit.ViT, "forward", counting)
    run = tmp_path / "run"
    assert main(["train", "--recipe", str(write_recipe(tmp_path / "r.yaml")), "--out", str(run)]) == 128 + 15
    monkeypatch.setattr(vitkit.ViT, "forward", forward)
    train_ok("--resume", str(run))
    got, want = read_metrics(run / "metrics.csv"), read_metrics(tiny_run / "metrics.csv")
    assert [r["step"] for r in got] == [22, 44]
    for key in ("train_loss", "train_acc", "val_top1", "val_loss"):
        assert [r[key] for r in got] == [r[key] for r in want], key


def test_resume_keeps_the_best_score(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    state = torch.load(run / "state.pt", weights_only=True)
    state["best_top1"] = 1.01  # an earlier epoch scored better than any epoch can
    torch.save(state, run / "state.pt")
    before = hashlib.sha1((run / "best.safetensors").read_bytes()).hexdigest()
    train_ok("--resume", str(run), "--epochs", "3")
    assert hashlib.sha1((run / "best.safetensors").read_bytes()).hexdigest() == before
    assert torch.load(run / "state.pt", weights_only=True)["best_top1"] == 1.01


def test_failed_export_leaves_the_previous_state(tmp_path, monkeypatch, caplog):
    real, calls = vitkit.save_model, []

    def full_disk_on_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # epoch 1 wrote last + best; epoch 2's last fails
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(vitkit, "save_model", full_disk_on_the_third)
    run = tmp_path / "run"
    assert main(["train", "--recipe", str(write_recipe(tmp_path / "r.yaml")), "--out", str(run)]) == 1
    assert torch.load(run / "state.pt", weights_only=True)["step"] == 22
    assert "No space left on device" in caplog.text and "(step 22)" in caplog.text


def test_eval_uses_the_recorded_split_seed(tmp_path, capsys):
    run = tmp_path / "run"
    train_ok("--recipe", str(write_recipe(tmp_path / "r.yaml", data={"split_seed": 3}, train={"epochs": 1})),
             "--out", str(run))
    x, y = digits_tensors()
    _, val3 = stratified_split(y, 0.2, 3)
    _, val0 = stratified_split(y, 0.2, 0)
    assert set(val3.tolist()) != set(val0.tolist())  # the seed chooses the images
    capsys.readouterr()
    assert main(["eval", "--data", "digits", "--weights", str(run / "best.safetensors"), "--json",
                 "--workers", "0", "--out", str(tmp_path)]) == 0
    got = json.loads(capsys.readouterr().out)
    model = vitkit.load_model(run / "best.safetensors")
    with torch.no_grad():
        logits = model(x[val3])
    assert got["loss"] == pytest.approx(F.cross_entropy(logits, y[val3]).item(), rel=1e-5)
    assert got["top1"] == read_metadata(run / "best.safetensors")["train"]["val_top1"]


def test_resume_refuses_another_split_seed(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "data.split_seed=5"]) == 2
    assert "data.split_seed cannot change in a run (0 -> 5)" in capsys.readouterr().err


def test_preload_cache_sees_a_rewritten_image(tmp_path):
    files = digit_images(tmp_path / "ds", ["0", "1"], per_class=4)
    cache = str(tmp_path / "cache")
    before = open_data(str(tmp_path / "ds"), cache_dir=cache).train.images.clone()
    new = np.zeros((8, 8, 3), np.uint8)
    new[2:6, 2:6] = 255
    Image.fromarray(new).save(files["0"][0])  # same name, other picture
    after = open_data(str(tmp_path / "ds"), cache_dir=cache).train.images
    assert torch.equal(after[0], torch.from_numpy(new).permute(2, 0, 1))
    assert torch.equal(after[1:], before[1:])


def test_shard_order_changes_with_the_epoch(tmp_path):
    stream = open_data(digit_shards(tmp_path, 6, 10)).train
    stream.shuffle_buffer = 1  # no sample shuffle: the order is the shards' order

    def labels(epoch):
        return [y for _, y in stream.configure(lambda im: 0, 7, epoch)]

    e0, e1 = labels(0), labels(1)
    assert sorted(e0) == sorted(e1) and e0 != e1
    assert labels(0) == e0  # and reproducible


def test_augmentation_rates_are_the_recipes():
    from torchvision.transforms import v2

    from vitkit.data.augment import BatchShiftFlip, batch_mixer, train_transform
    from vitkit.data.datasets import TensorImages

    aug = {**R.defaults()["augment"], "hflip": 0.3, "random_erasing": 0.25}
    ops = {type(t).__name__: t for t in train_transform(aug, (8, 8), {"mean": [0.5] * 3, "std": [0.5] * 3}).transforms}
    assert ops["RandomErasing"].p == 0.25 and ops["RandomHorizontalFlip"].p == 0.3
    mixup = batch_mixer({**aug, "mixup": 0.2, "cutmix": 0.0}, 10)
    cutmix = batch_mixer({**aug, "mixup": 0.0, "cutmix": 1.0}, 10)
    assert type(mixup) is v2.MixUp and mixup.alpha == 0.2 and type(cutmix) is v2.CutMix and cutmix.alpha == 1.0
    both = batch_mixer({**aug, "mixup": 0.8, "cutmix": 1.0}, 10)
    assert {type(t): t.alpha for t in both.transforms} == {v2.MixUp: 0.8, v2.CutMix: 1.0}

    ds = TensorImages(torch.zeros(2000, 3, 8, 8, dtype=torch.uint8), torch.zeros(2000, dtype=torch.long))
    for rate in (0.1, 0.9):
        batched = BatchShiftFlip.applies({**aug, "random_erasing": 0.0, "crop": "pad", "padding": 1, "hflip": rate},
                                         ds, (8, 8), {"mean": [0.5] * 3, "std": [0.5] * 3}, seed=0)
        _, _, flip = batched.draws(np.zeros(2000, np.int64), np.arange(2000))
        assert flip.float().mean().item() == pytest.approx(rate, abs=0.04)


def test_checkpoint_minutes_saves_mid_epoch(tmp_path, monkeypatch):
    from vitkit.train import trainer

    real, steps = trainer.atomic_save, []

    def recording(obj, path, **kwargs):
        steps.append(obj["step"])
        return real(obj, path, **kwargs)

    monkeypatch.setattr(trainer, "atomic_save", recording)
    train_ok("--recipe", str(write_recipe(tmp_path / "r.yaml", train={"epochs": 1, "checkpoint_minutes": 1e-9})),
             "--out", str(tmp_path / "run"))
    assert steps == list(range(1, 23))  # overdue after every step; the epoch's end saves step 22


def test_nonfinite_gradient_stops_before_the_step(tmp_path, monkeypatch, caplog):
    real, calls = torch.nn.utils.clip_grad_norm_, []

    def nan_at_the_third(params, max_norm, *args, **kwargs):
        calls.append(1)
        norm = real(params, max_norm, *args, **kwargs)
        return torch.full_like(norm, float("nan")) if len(calls) == 3 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", nan_at_the_third)
    code = main(["train", "--recipe", str(write_recipe(tmp_path / "r.yaml")), "--out", str(tmp_path / "run")])
    assert code == 1 and "non-finite at step 3" in caplog.text


def test_a_budget_run_that_reaches_its_step_limit_unfitted_still_ends_at_min_lr(tmp_path):
    """One epoch of 22 steps under a 5-minute budget: the step limit comes before any fit (it ended at the peak)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", schedule={"warmup_fraction": 0.1}, train={"log_every": 1})
    train_ok("--recipe", str(recipe), "--epochs", "1", "--time-budget", "5", "--out", str(run))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    lrs = [e.value for e in events.Scalars("train/lr")]
    r = yaml.safe_load((run / "recipe.yaml").read_text())
    assert len(lrs) == 22 and lrs[-1] == 0.0 and max(lrs) == pytest.approx(0.003)
    assert lrs == pytest.approx([lr_at(i, 22, r["schedule"], 0.003) for i in range(22)], rel=1e-6)  # as without one


def test_peak_lr_by_planned_epochs():
    """optim.lr as [epochs, lr] pairs: the power law through the two around the run's length, flat beyond."""
    from vitkit.train.trainer import peak_lr

    pairs = [[40, 0.05], [16, 0.1]]  # any order
    assert [peak_lr(pairs, e) for e in (1, 16, 40, 200)] == pytest.approx([0.1, 0.1, 0.05, 0.05])
    assert peak_lr(pairs, 25.3) == pytest.approx(0.1 * 0.5 ** (np.log(25.3 / 16) / np.log(40 / 16)))
    assert peak_lr(pairs, np.sqrt(16 * 40)) == pytest.approx(np.sqrt(0.1 * 0.05))  # the geometric middle
    three = [[10, 1.0], [20, 0.5], [40, 0.4]]
    assert [peak_lr(three, e) for e in (15, 30)] == pytest.approx([2 ** -np.log2(1.5), 0.5 * 0.8 ** np.log2(1.5)])
    assert peak_lr([[10, 0.3]], 99) == 0.3 and peak_lr(0.3, 99) == 0.3


@pytest.mark.parametrize("budget", [False, True])
def test_a_run_takes_the_peak_lr_of_its_planned_length(tmp_path, budget, caplog):
    """2 epochs of 22 steps with peaks tuned at 1 and 4 epochs: 0.006 * (1/4) ** (1/2) = 0.003, the geometric
    middle. Under a time budget with room for all 4 epochs of train.epochs, the fit plans 4: 0.0015."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", optim={"lr": [[1, 0.006], [4, 0.0015]]},
                          schedule={"warmup_fraction": 0.1}, train={"log_every": 1})
    with caplog.at_level("INFO", logger="vitkit"):
        train_ok("--recipe", str(recipe), "--out", str(run),
                 *(["--epochs", "4", "--time-budget", "10"] if budget else ["--epochs", "2"]))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    lrs = [e.value for e in events.Scalars("train/lr")]
    r = yaml.safe_load((run / "recipe.yaml").read_text())
    assert r["optim"]["lr"] == [[1, 0.006], [4, 0.0015]]
    if budget:
        assert "-> 88 steps (4.0 epochs), peak lr 0.0015" in caplog.text
        assert len(lrs) == 88 and max(lrs) == pytest.approx(0.0015) and lrs[30:] == pytest.approx(
            [lr_at(i, 88, r["schedule"], 0.0015) for i in range(30, 88)], rel=1e-6)
    else:
        assert "peak lr 0.003 for 2.0 epochs" in caplog.text
        assert lrs == pytest.approx([lr_at(i, 44, r["schedule"], 0.003) for i in range(44)], rel=1e-6)


def test_a_run_without_a_budget_resumed_with_one_goes_on_along_its_schedule(tmp_path):
    """Its schedule is known (the state says so): the budget refits the decay's end and the learning rate goes on
    from where it was; it used to run a warm-up by the clock of all the earlier training, which was at the peak."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", schedule={"warmup_fraction": 0.05}, train={"log_every": 1})
    train_ok("--recipe", str(recipe), "--out", str(run))  # 2 epochs, 44 steps, ends at lr 0
    assert torch.load(run / "state.pt", weights_only=True)["fitted"] is True
    train_ok("--resume", str(run), "--epochs", "4", "--time-budget", "0.1")
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    lrs = {e.step: e.value for e in events.Scalars("train/lr")}
    assert lrs[45] < 0.9 * 0.003 and all(lrs[k + 1] <= lrs[k] * (1 + 1e-6) for k in range(45, max(lrs))), lrs


def test_shard_readers_draw_their_own_augmentations(tmp_path):
    """Readers with shards of their own numbered their samples alike and seeded each draw by that number: the
    n-th sample of every rank got the same crop/flip/RandAugment."""
    stream = open_data(digit_shards(tmp_path, 4, 30)).train
    draws = [x for rank in range(2) for x, _ in stream.configure(lambda im: torch.rand(1).item(), 7, 1, rank=rank,
                                                                   world=2)]
    assert len(draws) == 120 and len(set(draws)) == 120


def test_bad_shard_samples_are_skipped_and_listed(tmp_path):
    """An out-of-range label (unchecked with data.epoch_size), an image over the pixel limit and a damaged one
    were tracebacks mid-training."""
    import io

    import webdataset as wds
    from PIL import Image

    from vitkit.data.datasets import collate
    from vitkit.data.images import MAX_PIXELS

    def png(img):
        buf = io.BytesIO()
        img.save(buf, "PNG")
        return buf.getvalue()

    good = png(Image.new("RGB", (8, 8), "red"))
    side = int(MAX_PIXELS ** 0.5) + 100
    with wds.TarWriter(str(tmp_path / "s-000.tar")) as sink:
        for key, image, label in [("a", good, 0), ("b", good, 1), ("c", good, 5),
                                  ("d", png(Image.new("1", (side, side))), 1), ("e", good[:-30], 0)]:
            sink.write({"__key__": key, "png": image, "cls": label})
    (tmp_path / "classes.txt").write_text("zero\none\n")
    data = open_data(str(tmp_path / "s-{000..000}.tar"), shards={"epoch_size": 5})
    _, labels, skipped = collate(list(data.train.configure(lambda im: torch.zeros(3, 8, 8))))
    assert labels.tolist() == [0, 1] and len(skipped) == 3
    assert "s-000.tar:c: label 5 is not one of the 2 classes (0..1)" in skipped[0]
    assert "s-000.tar:d: image too large" in skipped[1] and "s-000.tar:e: corrupt or truncated image" in skipped[2]


def test_stem_init_whiten_starts_from_the_training_patches_principal_components(tmp_path):
    """model.stem_init whiten: the first conv's filters come in +/- pairs of orthogonal directions (the first
    component is the patches' brightness); the default initialisation has neither property."""
    model = {"conv_stem": [8, 16], "patch_size": 1, "img_size": 8}
    first = {}
    for init in (None, "whiten"):  # a learning rate so small that the step leaves the initialisation as it was
        train_ok("--recipe", str(write_recipe(tmp_path / "r.yaml", model={**model, "stem_init": init},
                                              optim={"lr": 1e-12})),
                 "--set", "train.max_steps=1", "--out", str(tmp_path / str(init)))
        w = vitkit.load_model(tmp_path / str(init) / "last.safetensors").state_dict()
        first[init] = w["patch_embed.backbone.0.conv.weight"].flatten(1).double()
    w = first["whiten"]
    torch.testing.assert_close(w[4:], -w[:4], rtol=0, atol=1e-9)
    unit = w[:4] / w[:4].norm(dim=1, keepdim=True)
    torch.testing.assert_close(unit @ unit.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-6)
    assert (unit[0] > 0).all() or (unit[0] < 0).all()  # the brightness filter: one sign on every pixel
    assert not torch.allclose(first[None][4:], -first[None][:4], atol=1e-3)


def test_stem_init_whiten_on_shards_is_one_line_before_any_work(tmp_path, capsys):
    """A stream cannot be sampled up front: one line, before the run directory is made."""
    recipe = write_recipe(tmp_path / "r.yaml", model={"conv_stem": [8, 16], "patch_size": 1, "stem_init": "whiten"},
                          data={"path": digit_shards(tmp_path, 2, 40), "val_split": 0.0})
    capsys.readouterr()
    assert main(["train", "--recipe", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.stem_init whiten needs indexable training data, not WebDataset shards" in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_lr_batch_scales_the_peak_learning_rate_with_the_batch(tmp_path, caplog):
    """optim.lr_batch: optim.lr is the rate for that batch, scaled linearly (DeiT's 5e-4 x batch / 512)."""
    caplog.set_level(logging.INFO, logger="vitkit")
    recipe = write_recipe(tmp_path / "r.yaml", optim={"lr": 0.002, "lr_batch": 128}, schedule={"name": "constant"},
                          data={"batch_size": 32}, train={"epochs": 1})
    assert main(["train", "--recipe", str(recipe), "--out", str(tmp_path / "run")]) == 0
    assert read_metrics(tmp_path / "run" / "metrics.csv")[-1]["lr"] == pytest.approx(0.0005)
    assert "peak lr 0.0005: optim.lr 0.002 for batch 128, scaled to batch 32 (optim.lr_batch)" in caplog.text


def test_a_warm_up_as_long_as_the_run_and_a_huge_resample_are_said(tmp_path, caplog):
    """finetune.yaml's 500 warm-up steps in a 500-step run leave one step of decay; a checkpoint for 8 px inputs
    fine-tuned at 96 px has 144x the tokens: both said before the run, not found out after it."""
    recipe = write_recipe(tmp_path / "r.yaml", schedule={"warmup_steps": 500}, train={"epochs": 1})
    assert main(["train", "--recipe", str(recipe), "--out", str(tmp_path / "run")]) == 0
    assert "the warm-up takes 21 of the run's 22 steps, so the rate falls from its peak to the end in one step" in \
        caplog.text
    model = vitkit.load_model(tmp_path / "run" / "best.safetensors", img_size=96)
    assert model.cfg.grid == (48, 48)
    assert "position embeddings resampled from 4x4 to 48x48 (12x per side: 2304 tokens" in caplog.text
