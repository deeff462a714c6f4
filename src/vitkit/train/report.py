"""What a run leaves to read: metrics.csv, TensorBoard events, training-curves and confusion-matrix PNGs."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import torch

from ..files import replacing

log = logging.getLogger("vitkit")
COLUMNS = ["epoch", "step", "lr", "train_loss", "train_acc", "val_loss", "val_top1", "val_top5",
           "images_per_s", "elapsed_s"]


class Metrics:
    """One CSV row per evaluation (appended, so a resumed run continues the file) + TensorBoard scalars."""

    def __init__(self, run_dir: Path, enabled: bool, upto_step: int | None = None, defer: bool = False):
        """upto_step: the step the run starts from (0: a fresh run); rows and TensorBoard events an earlier,
        stopped or killed process wrote after it are dropped (its CSV rows) or purged (its events), so that a
        resumed or restarted run has each step once. defer: a run gone back to state.prev.pt; the later rows
        belong to state.pt until the run's first save replaces it, so they are dropped then (`commit`) and the
        run's own are held until that moment."""
        self.run_dir, self.csv_path, self.enabled, self.upto_step = run_dir, run_dir / "metrics.csv", enabled, upto_step
        self.tb, self.held = None, [] if defer and enabled else None
        if enabled and not defer:
            self._open()

    def _open(self) -> None:
        if self.upto_step is not None and self.csv_path.exists():
            rows = read_metrics(self.csv_path, bad := [])
            kept = [r for r in rows if r["step"] is not None and r["step"] <= self.upto_step]
            if bad:
                log.warning("%s: %d rows that are not metrics (edited or damaged) left out", self.csv_path, len(bad))
            if len(kept) < len(rows) or bad:
                with replacing(self.csv_path) as tmp, open(tmp, "w", newline="") as f:
                    w = csv.DictWriter(f, COLUMNS)
                    w.writeheader()
                    w.writerows({k: "" if v is None else int(v) if k == "step" else f"{v:.6g}" for k, v in r.items()}
                                for r in kept)
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the events of earlier files at steps >= it (a killed run logged
            # steps past its last checkpoint; the resumed run logs them again)
            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"),
                                    purge_step=None if self.upto_step is None else self.upto_step + 1)
        except ImportError:
            log.warning("tensorboard is not installed: metrics go to metrics.csv only")

    def commit(self) -> None:
        """The run's first save is on disk: the held rows and scalars are written (deferred runs; else nothing)."""
        if self.held is None:
            return
        held, self.held = self.held, None
        if self.enabled:
            self._open()
            for step, values, is_row in held:
                self.row(**values) if is_row else self.scalars(step, **values)

    def scalars(self, step: int, **values: float) -> None:
        if self.held is not None:
            self.held.append((step, values, False))
        elif self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def row(self, **values) -> None:
        if not self.enabled:
            return
        if self.held is not None:
            self.held.append((values["step"], values, True))
            return
        new = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
        open_line = not new and _ends_open(self.csv_path)  # a hand edit's last line: this row goes on its own
        with open(self.csv_path, "a", newline="") as f:
            w = csv.DictWriter(f, COLUMNS)
            if new:
                w.writeheader()
            elif open_line:
                f.write("\n")
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in values.items() if k in COLUMNS})
        self.scalars(values["step"], **{f"{'val' if k.startswith('val') else 'train'}/{k}": v
                                         for k, v in values.items() if k.startswith(("val_", "train_")) and v != ""})

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _ends_open(path: Path) -> bool:
    """Whether a file's last line has no line break."""
    with open(path, "rb") as f:
        return f.seek(0, 2) > 0 and (f.seek(-1, 2), f.read(1))[1] != b"\n"


def read_metrics(path: Path, unreadable: list | None = None) -> list[dict]:
    """The rows of metrics.csv as numbers (None where empty). A row that is not one (a hand edit, a spreadsheet's
    note, a half-written last line, zero bytes a crash left) is skipped, and appended to `unreadable` if given."""
    rows = []
    with open(path, newline="", errors="replace") as f:
        reader = csv.DictReader(f)
        try:
            for row in reader:
                try:
                    if reader.fieldnames != COLUMNS or None in row or None in row.values():  # fields over or missing
                        raise ValueError
                    rows.append({k: float(v) if v != "" else None for k, v in row.items()})
                except ValueError:
                    if unreadable is not None:
                        unreadable.append(row)
        except csv.Error as e:  # the rest cannot be parsed
            if unreadable is not None:
                unreadable.append(str(e))
    return rows


def _figure(ncols: int, width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(1, ncols, figsize=(width, height))


def plot_curves(metrics_csv: Path, out: Path) -> Path | None:
    """Loss (train, val), validation accuracy and learning rate against epochs. A picture: whatever keeps it from
    being drawn is said in one line, never the end of a run."""
    try:
        return _plot_curves(metrics_csv, out)
    except Exception as e:
        log.warning("%s not drawn: %s", out, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None


def _plot_curves(metrics_csv: Path, out: Path) -> Path | None:
    rows = read_metrics(metrics_csv) if metrics_csv.exists() else []
    if not rows:
        return None
    plt, fig, (ax_loss, ax_acc, ax_lr) = _figure(3, 13, 3.6)
    epochs = [r["epoch"] for r in rows]
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        pts = [(e, r[key]) for e, r in zip(epochs, rows) if r[key] is not None]
        if pts:
            ax_loss.plot(*zip(*pts), marker=".", label=label)
    for key, label in (("train_acc", "train top-1"), ("val_top1", "val top-1"), ("val_top5", "val top-5")):
        pts = [(e, 100 * r[key]) for e, r in zip(epochs, rows) if r[key] is not None]
        if pts:
            ax_acc.plot(*zip(*pts), marker=".", label=label)
    ax_lr.plot(epochs, [r["lr"] for r in rows], marker=".")
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy (%)"), (ax_lr, "learning rate")):
        ax.set_title(title), ax.set_xlabel("epoch"), ax.grid(alpha=0.3)
    ax_loss.legend(), ax_acc.legend()
    from ..inspect.figure7 import save_figure  # matplotlib only when drawing

    save_figure(fig, out, dpi=100)
    plt.close(fig)
    return out


def shown(text: str) -> str:
    """Text as it can be printed or drawn: a folder name that is not valid UTF-8 (its bytes kept by Python as
    surrogates) gets a replacement character where they are."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def write_confusion(confusion: torch.Tensor, names: list[str], out: Path) -> Path:
    """The confusion matrix as counts: one row per true class, one column per predicted class (class names as
    their folders' bytes)."""
    with replacing(out) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *names])
        w.writerows([name, *row] for name, row in zip(names, confusion.tolist()))
    return out


def plot_confusion(confusion: torch.Tensor, names: list[str], out: Path, title: str = "") -> Path | None:
    """Row-normalised confusion matrix (rows: true class, columns: predicted); counts written when few classes."""
    k, names, title = len(names), [shown(n) for n in names], shown(title)
    if k > 100:
        log.warning("%d classes: confusion-matrix picture skipped (the numbers are in confusion.csv)", k)
        return None
    size = min(4 + 0.35 * k, 30)
    plt, fig, ax = _figure(1, size + 1.5, size)
    c = confusion.double()
    rates = c / c.sum(1, keepdim=True).clamp(min=1)
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ticks = list(range(k))
    ax.set_xticks(ticks, names, rotation=90 if k > 10 else 0, fontsize=8)
    ax.set_yticks(ticks, names, fontsize=8)
    ax.set_xlabel("predicted"), ax.set_ylabel("true"), ax.set_title(title)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if confusion[i, j]:
                    ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    from ..inspect.figure7 import save_figure  # matplotlib only when drawing

    save_figure(fig, out, dpi=100)
    plt.close(fig)
    return out
