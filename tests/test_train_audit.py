"""Run-directory artifacts after interruptions: TensorBoard has each step once after a resume or a restart,
a failed run releases its directory, a stop requested during an epoch's evaluation stops at that epoch's end,
and best.safetensors is the epoch the log marks as best."""
from __future__ import annotations

import collections
import os
import signal

import pytest
import torch

import vitkit
from train_utils import write_recipe
from vitkit.train import trainer
from vitkit.train.trainer import TrainingError

STEPS_PER_EPOCH = 1438 // 64  # TINY: digits, 20% held out, batch 64


def scalars(run, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={SCALARS: 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def stale_events(run, steps) -> None:
    """What a process killed after its last checkpoint leaves: events at steps the next process logs again."""
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(run / "tensorboard"))
    for s in steps:
        w.add_scalar("train/loss_step", 1e6, s)
    w.close()


def test_tensorboard_has_each_step_once_after_a_kill_and_resume(tmp_path):
    run = vitkit.train_model(write_recipe(tmp_path / "r.yaml"), out=tmp_path / "run", epochs=1,
                             values={"train.log_every": 5})
    stale_events(run, range(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH + 1))  # logged in epoch 2, then killed
    vitkit.train_model(resume=run, epochs=2)
    loss = scalars(run, "train/loss_step")
    steps = [s for s, _ in loss]
    assert not [s for s, n in collections.Counter(steps).items() if n > 1], "steps logged twice"
    assert steps == sorted(steps) and steps[-1] > STEPS_PER_EPOCH
    assert max(v for _, v in loss) < 1e6  # the resumed run's values, not the killed process's


def test_a_restarted_run_drops_what_a_first_attempt_left(tmp_path):
    """A first attempt killed before its first checkpoint leaves no state.pt, so `--out` the same directory is
    allowed: its TensorBoard events and metrics rows must not stay mixed into the new run's."""
    recipe, run = write_recipe(tmp_path / "r.yaml"), tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(recipe.read_text())  # what the first attempt wrote before its first step
    stale_events(run, [10, 20])
    (run / "metrics.csv").write_text("epoch,step,lr,train_loss,train_acc,val_loss,val_top1,val_top5,images_per_s,"
                                     "elapsed_s\n1,22,0.001,9,0.1,9,0.1,0.5,100,1\n")
    vitkit.train_model(recipe, out=run, epochs=1)  # "start it again with --out RUN (its files are replaced)"
    assert [s for s, _ in scalars(run, "train/loss_step")] == [10, 20]
    assert max(v for _, v in scalars(run, "train/loss_step")) < 1e6
    assert (run / "metrics.csv").read_text().count("\n") == 2  # header + this run's one epoch


def test_a_failed_run_releases_its_directory(tmp_path):
    """A TrainingError the caller keeps (an interactive session keeps the last traceback) holds the frame of the
    failed run; its lock must be released anyway, and its curves drawn."""
    run = vitkit.train_model(write_recipe(tmp_path / "r.yaml"), out=tmp_path / "run", epochs=1)
    (run / "curves.png").unlink()
    with pytest.raises(TrainingError) as failed:
        vitkit.train_model(resume=run, epochs=2, values={"optim.lr": 1e6, "schedule.name": "constant"})
    curves_drawn = (run / "curves.png").is_file()
    kept = failed  # noqa: F841 (the traceback stays alive)
    assert vitkit.train_model(resume=run, epochs=2, values={"optim.lr": 0.003}) == run  # not "in use"
    assert curves_drawn
    assert torch.load(run / "state.pt", weights_only=True)["step"] == 2 * STEPS_PER_EPOCH


def test_a_stop_during_evaluation_stops_at_that_epochs_end(tmp_path, monkeypatch):
    evaluate, calls = trainer.evaluate, []

    def terminated_while_evaluating(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", terminated_while_evaluating)
    with pytest.raises(KeyboardInterrupt):
        vitkit.train_model(write_recipe(tmp_path / "r.yaml"), out=tmp_path / "run", epochs=2)
    # everything was saved at the epoch's end: no further step, no second save
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=True)["step"] == STEPS_PER_EPOCH


def test_best_checkpoint_is_the_epoch_marked_best(tmp_path, monkeypatch, capsys):
    """Equal validation accuracy in a later epoch: the log marks the first as the best (*); best.safetensors must
    hold that epoch, not the later one."""
    evaluate = trainer.evaluate

    def always_the_same(*args, **kwargs):
        result = evaluate(*args, **kwargs)
        k = result.confusion.shape[0]
        result.confusion = torch.eye(k, dtype=torch.long) * 30  # the same accuracy every epoch
        return result

    monkeypatch.setattr(trainer, "evaluate", always_the_same)
    run = vitkit.train_model(write_recipe(tmp_path / "r.yaml"), out=tmp_path / "run", epochs=2)
    marked = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch") and " *" in line]
    assert len(marked) == 1 and marked[0].split()[1].startswith("1.0")
    from vitkit.weights.vitkit_format import read_metadata

    assert read_metadata(run / "best.safetensors")["train"]["step"] == STEPS_PER_EPOCH


def test_one_slow_save_does_not_cut_a_budget_run_short(tmp_path, monkeypatch):
    """A save that stalled (a busy disk, a paused process) was counted as the time every later save would take,
    and twice; the schedule is fitted to typical (median) times and refitted as the run goes."""
    import time

    from vitkit.train.report import read_metrics

    save, calls = trainer.atomic_save, []

    def one_stall(*args, **kwargs):
        calls.append(1)
        if len(calls) == 15:  # late in the run: the decay is under way
            time.sleep(4)
        return save(*args, **kwargs)

    monkeypatch.setattr(trainer, "atomic_save", one_stall)
    budget_s = 15
    run = vitkit.train_model(write_recipe(tmp_path / "r.yaml"), out=tmp_path / "run", epochs=1000,
                             time_budget=budget_s / 60)
    rows = read_metrics(run / "metrics.csv")
    lrs = [r["lr"] for r in rows]
    # was: the stall's time taken for every later save's, so the schedule's end was pulled in to the next
    # epoch (lr 2.5e-5) and pushed out again after it (lr 2.8e-3)
    rises = [(i, a, b) for i, (a, b) in enumerate(zip(lrs, lrs[1:])) if b > 1.1 * a + 3e-5]
    assert not rises, rises
    assert lrs[-1] < 0.05 * 0.003  # the decay ran to its end (TINY's peak lr: 0.003)
    assert rows[-1]["elapsed_s"] > 0.8 * budget_s  # and the budget was used


def test_a_finished_budget_run_resumed_with_more_time_trains_on(tmp_path):
    """The fitted step count was kept from the state whatever the new --time-budget or --epochs said."""
    run = vitkit.train_model(write_recipe(tmp_path / "r.yaml"), out=tmp_path / "run", epochs=1000,
                             time_budget=0.05)
    first = torch.load(run / "state.pt", weights_only=True)
    vitkit.train_model(resume=run, time_budget=0.15)
    second = torch.load(run / "state.pt", weights_only=True)
    assert second["step"] > first["step"] + 2 * STEPS_PER_EPOCH and second["elapsed"] > 6


def test_a_diverged_validation_loss_stops_without_saving(tmp_path, monkeypatch):
    """Weights that give a non-finite validation loss were saved as the last (and the best) checkpoint."""
    evaluate, calls = trainer.evaluate, []

    def diverged_in_epoch_2(*args, **kwargs):
        result = evaluate(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            result.loss_sum = float("nan")
        return result

    monkeypatch.setattr(trainer, "evaluate", diverged_in_epoch_2)
    with pytest.raises(TrainingError, match=r"validation loss became non-finite.*\(step 22\)") as stopped:
        vitkit.train_model(write_recipe(tmp_path / "r.yaml"), out=tmp_path / "run", epochs=3)
    assert f"--weights {tmp_path / 'run' / 'best.safetensors'}" in str(stopped.value)  # an earlier epoch's
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=True)["step"] == STEPS_PER_EPOCH


def test_half_written_files_of_a_killed_process_are_removed(tmp_path):
    run = vitkit.train_model(write_recipe(tmp_path / "r.yaml"), out=tmp_path / "run", epochs=1)
    (run / ".last.safetensors.12345.tmp").write_bytes(b"\0" * 1000)  # killed mid-export
    vitkit.train_model(resume=run, epochs=2)
    assert not list(run.glob(".*.tmp"))


def test_a_checkpoint_says_when_its_recipe_alone_does_not_retrain_it(tmp_path, caplog):
    """A run resumed with other values is not what its final recipe trains from scratch (8 epochs stretched to
    12 is not a 12-epoch run): the checkpoint records the change and `--recipe CHECKPOINT` says so."""
    from vitkit.train import recipe as R
    from vitkit.weights.vitkit_format import read_metadata

    run = vitkit.train_model(write_recipe(tmp_path / "r.yaml"), out=tmp_path / "run", epochs=1)
    vitkit.train_model(resume=run, epochs=2)
    resumed = read_metadata(run / "last.safetensors")["train"]["resumed"]
    assert resumed == [{"step": STEPS_PER_EPOCH, "changed": {"train.epochs": [1, 2]}}]
    assert R.load(run / "last.safetensors")["train"]["epochs"] == 2
    assert f"resumed at step {STEPS_PER_EPOCH} with train.epochs 1 -> 2" in caplog.text


def test_a_failed_run_still_says_why_when_its_curves_cannot_be_drawn(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer, "plot_curves", full_disk)
    with pytest.raises(TrainingError, match="non-finite"):  # was: the OSError of the plot, a traceback
        vitkit.train_model(write_recipe(tmp_path / "r.yaml"), out=tmp_path / "run", epochs=1,
                           values={"optim.lr": 1e6, "schedule.name": "constant"})


def test_going_back_a_save_keeps_a_better_best_of_the_later_evaluations(tmp_path, monkeypatch):
    """best.safetensors is the best evaluation of the run directory: going back to state.prev.pt, whose best score
    is lower than that of the state it goes back from, a new evaluation between the two does not replace it."""
    evaluate, scores = trainer.evaluate, []

    def scored(*args, **kwargs):  # the real evaluation, with the top-1 of the test's script
        result = evaluate(*args, **kwargs)
        n = result.n
        hits = round(scores.pop(0) * n)
        result.confusion = torch.zeros_like(result.confusion)
        result.confusion[0, 0], result.confusion[0, 1] = hits, n - hits
        return result

    monkeypatch.setattr(trainer, "evaluate", scored)
    scores[:] = [0.5, 0.6, 0.9]
    run = vitkit.train_model(write_recipe(tmp_path / "r.yaml"), out=tmp_path / "run", epochs=3)
    best = (run / "best.safetensors").read_bytes()
    assert torch.load(run / "state.prev.pt", weights_only=True)["best_top1"] == pytest.approx(0.6, abs=0.01)
    scores[:] = [0.7]  # better than the state gone back to, worse than the epoch it drops
    vitkit.train_model(resume=run / "state.prev.pt")
    assert (run / "best.safetensors").read_bytes() == best
    assert torch.load(run / "state.pt", weights_only=True)["best_top1"] == pytest.approx(0.9, abs=0.01)


def test_a_full_disk_under_torch_save_is_an_oserror(tmp_path, monkeypatch):
    """torch's zip writer, closed after a write failed, raises RuntimeError("unexpected pos ...") over the
    OSError: atomic_save says the OSError (ENOSPC), so that a full disk gives up state.prev.pt, not the run."""
    import builtins
    import errno
    import io

    from vitkit.train import rundir

    class Full(io.FileIO):
        written = 0

        def write(self, b):
            self.written += len(b)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(b)

    real_open = builtins.open
    monkeypatch.setattr(rundir, "open", lambda p, mode="r", *a, **k: Full(p, "wb") if mode == "wb"
                        else real_open(p, mode, *a, **k), raising=False)
    with pytest.raises(OSError) as e:
        rundir.atomic_save({"x": torch.zeros(100_000)}, tmp_path / "state.pt")
    assert e.value.errno == errno.ENOSPC and os.listdir(tmp_path) == []


def test_going_back_in_a_run_without_recipe_yaml_or_through_a_link(tmp_path, caplog, capsys):
    """The state holds the recipe: a run directory without recipe.yaml goes back and saves (it was: "cannot write
    the checkpoint" after state.pt was written, the metrics of the later state kept); a link to state.prev.pt
    goes back in the run the link points into, not in the link's folder."""
    from vitkit.cli import main

    run = vitkit.train_model(write_recipe(tmp_path / "r.yaml"), out=tmp_path / "run", epochs=2)
    rows = (run / "metrics.csv").read_text()
    os.unlink(run / "recipe.yaml")
    (tmp_path / "elsewhere").mkdir()
    os.symlink(run / "state.prev.pt", tmp_path / "elsewhere" / "state.prev.pt")
    assert main(["train", "--resume", str(tmp_path / "elsewhere" / "state.prev.pt")]) == 0
    assert os.listdir(tmp_path / "elsewhere") == ["state.prev.pt"]
    assert torch.load(run / "state.pt", weights_only=True)["step"] == 2 * STEPS_PER_EPOCH
    assert (run / "recipe.yaml").is_file() and "cannot write" not in caplog.text
    assert (run / "metrics.csv").read_text().splitlines()[:2] == rows.splitlines()[:2]
    assert len((run / "metrics.csv").read_text().splitlines()) == 3
    os.unlink(run / "state.pt")  # the state file named, not there: the one before it is
    capsys.readouterr()
    assert main(["train", "--resume", str(run / "state.pt")]) == 2
    assert f"--resume {run / 'state.pt'}: no such file; --resume {run / 'state.prev.pt'} continues" in \
        capsys.readouterr().err


def test_accumulation_weighs_every_readable_image_alike(tmp_path):
    """With unreadable images, each micro-batch's mean loss counted the same whatever images it had left: the
    step's update changed with optim.accum_steps (0.14-0.44 relative error with 10 of 12 images readable)."""
    from safetensors.torch import load_file

    from train_utils import digit_images, write_recipe
    from vitkit.cli import main

    files = digit_images(tmp_path / "ds", ["1", "2", "3"], per_class=4)
    for f in (files["1"][0], files["2"][1]):
        f.write_bytes(b"not an image at all")
    updates = []
    for accum in (1, 3, 4):
        recipe = write_recipe(tmp_path / f"r{accum}.yaml", data={"path": str(tmp_path / "ds"), "batch_size": 12,
                                                                 "val_split": 0.0, "preload": False},
                              optim={"name": "sgd", "lr": 1.0, "momentum": 0.0, "weight_decay": 0.0,
                                     "accum_steps": accum, "clip_grad_norm": None},
                              schedule={"name": "constant", "warmup_steps": 0, "warmup_fraction": 0.0},
                              train={"epochs": 1})
        assert main(["train", "--recipe", str(recipe), "--out", str(tmp_path / f"run{accum}")]) == 0
        updates.append(load_file(str(tmp_path / f"run{accum}" / "last.safetensors")))
    for other in updates[1:]:
        for k, v in updates[0].items():
            assert torch.allclose(other[k], v, atol=1e-6, rtol=1e-5), k
