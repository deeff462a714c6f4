"""Labelled image datasets for training and evaluation.

DATA is one of: an ImageFolder directory (`train/` + `val/` subfolders, or class folders directly), a
.tar/.tar.gz of one (extracted once into a cache keyed by the archive's hash), `digits` (scikit-learn's
8x8 digits), `cifar10`/`cifar100` (torchvision; a local root, downloaded there when online), or WebDataset
shards (`shards-{000000..000099}.tar`, samples with an image and a `cls`). Small images (CIFAR-size) are
decoded once into a uint8 tensor cache, so later runs start in a second.

Everything that makes a dataset unusable (missing path, no classes, an empty class folder) raises DataError
before any work; single unreadable images are skipped, counted and reported, never fatal.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import random
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, Subset, get_worker_info
from torchvision import tv_tensors

from ..files import replacing
from .images import ImageError, decode, image_files, image_suffixes, is_junk, load_image

log = logging.getLogger("vitkit")
BUILTIN = ("digits", "cifar10", "cifar100")
LEFT_OUT = ".vitkit-left-out"  # beside an extracted archive: the members that were not extracted, and why
PRELOAD_MAX_PIXELS = 64 * 64  # "auto": preload images up to this size (CIFAR is 32x32)


class DataError(ValueError):
    """A dataset that cannot be used as given; the message names it and says why."""


@dataclass
class Data:
    train: Dataset | None  # gives (image, label); None when only evaluating
    val: Dataset | None
    class_names: list[str]
    name: str
    split: dict = field(default_factory=dict)  # how `val` was carved out, recorded in checkpoints
    skipped: list[str] = field(default_factory=list)  # unreadable files found while preparing
    val_name: str = ""  # what `val` is, in words ("the val/ folder", "held-out 20% (seed 0)", ...)


# --- sources --------------------------------------------------------------------------------------------
class TensorImages(Dataset):
    """Decoded uint8 images (N, C, H, W) in memory."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return tv_tensors.Image(self.images[i]), int(self.labels[i])


class FileImages(Dataset):
    """Image files read on demand with vitkit's robust reader (raises ImageError for a bad file)."""

    def __init__(self, paths: list[Path], labels: list[int], shown_as: tuple[str, str] | None = None):
        self.paths, self.labels = paths, torch.tensor(labels, dtype=torch.long)
        self.shown_as = shown_as  # (prefix, replacement) for the file names in messages

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return load_image(self.paths[i])[0], int(self.labels[i])
        except ImageError as e:
            if self.shown_as is None:
                raise
            raise ImageError(str(e).replace(*self.shown_as, 1)) from None


class Transformed(Dataset):
    """Applies `transform` to each image. Keys may be (epoch, index): the transform's random draws are then
    seeded by (seed, epoch, index), so augmentation does not depend on workers, resumption or rank.
    An unreadable image gives (None, message) for the collate function to drop and report."""

    def __init__(self, base: Dataset, transform, seed: int | None = None):
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        try:
            img, label = self.base[i]
        except ImageError as e:
            return None, str(e)
        try:
            if self.seed is None:
                return self.transform(img), label
            with seeded(self.seed, epoch, i):
                return self.transform(img), label
        except ImageError as e:  # eval_transform's: too elongated to resize
            return None, f"{_name_of(self.base, i)}: {e}"


def _name_of(ds: Dataset, i: int) -> str:
    """How messages name item i of a dataset: its file, where it has one."""
    while isinstance(ds, (Subset, _Relabelled)):
        i, ds = (ds.indices[i], ds.dataset) if isinstance(ds, Subset) else (i, ds.base)
    paths, shown_as = getattr(ds, "paths", None), getattr(ds, "shown_as", None)
    if paths is None:
        return f"image {i}"
    return str(paths[i]).replace(*shown_as, 1) if shown_as else str(paths[i])  # in an archive: its place there


@contextlib.contextmanager
def seeded(*key: int):
    """Torch's CPU random draws inside come from a generator seeded by `key`; the state outside is kept.
    (A tuple of ints hashes the same in every process, unlike strings.)"""
    gen = torch.random.default_generator
    saved = gen.get_state()
    gen.manual_seed(hash(key) & (2**63 - 1))
    try:
        yield
    finally:
        gen.set_state(saved)


def worker_init(_: int) -> None:
    """DataLoader worker_init_fn: the worker leaves its parent's process group. A signal sent to the whole group
    (Ctrl-C in a terminal, torchrun, Slurm, docker stop) then reaches the training process alone, which saves and
    ends its workers itself; a worker the signal killed first failed the loader, and the save with it. (A worker
    still ends with its parent: torch's workers watch it.)"""
    with contextlib.suppress(OSError):  # already a group leader (a spawn start method may make it one)
        os.setpgid(0, 0)


def collate(items: list) -> tuple[torch.Tensor | None, torch.Tensor | None, list[str]]:
    """(images, labels, messages of skipped images)."""
    good = [(x, y) for x, y in items if x is not None]
    skipped = [y for x, y in items if x is None]
    if not good:
        return None, None, skipped
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), skipped


# --- opening DATA ---------------------------------------------------------------------------------------
def cache_root(cache_dir: str | None) -> Path:
    named = "data.cache_dir" if cache_dir else "$VITKIT_CACHE" if os.environ.get("VITKIT_CACHE") else "the cache"
    root = Path(cache_dir or os.environ.get("VITKIT_CACHE") or Path.home() / ".cache" / "vitkit")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{named} {root}: cannot create it ({e.strerror or e})") from None
    return root


def is_shards(spec: str) -> bool:
    return "{" in spec and ".tar" in spec


def open_data(spec: str, *, val: str | None = None, val_split: float = 0.0, split_seed: int = 0,
              root: str | None = None, preload="auto", cache_dir: str | None = None,
              evaluate_only: bool = False, shards: dict | None = None) -> Data:
    """DATA -> Data(train, val, class_names). With evaluate_only, `val` holds what to evaluate: the val/
    folder or held-out split when there is one, else everything."""
    if not str(spec).strip():  # Path("") is the current directory
        raise DataError("DATA is empty: give a folder, a .tar(.gz), digits, cifar10, cifar100 or shards")
    name = spec
    skipped: list[str] = []
    held_name = "all"
    if spec in BUILTIN:
        if Path(spec).exists():
            log.warning("%s: the built-in dataset, not the %s here (name that ./%s)", spec,
                        "folder" if Path(spec).is_dir() else "file", spec)
        train, held = _builtin(spec, root, cache_dir)
        if evaluate_only and not val_split:  # an official test split: what `vitkit eval` scores
            held_name = "the test split" if held is not None else "all"
        elif held is not None and not val_split and val is None:
            log.info("%s: no validation (its test split stays unseen; --val-split holds out training images)", spec)
            held = None
    elif is_shards(spec):
        return _shards(spec, val, val_split, shards or {}, evaluate_only)
    else:
        folder = Path(spec)
        if not folder.exists():
            hint = "; shards are named with a brace range, e.g. 'train-{000000..000099}.tar'" if ".tar" in spec and \
                any(c in spec for c in "*?[") else ""
            raise DataError(f"{spec}: no such file or directory{hint}")
        if folder.is_file() and folder.stat().st_size == 0:
            raise DataError(f"{spec}: empty file")
        shown_as = None
        if folder.is_file():
            folder = _extract(folder, cache_dir)
            shown_as = (f"{folder}{os.sep}", f"{spec}:")  # name files by their place in the archive
        train_dir, val_dir, test_dir = _layout(folder, shown_as)
        if evaluate_only and val_dir is None and test_dir is not None and (not val_split or train_dir is None):
            val_dir = test_dir  # `vitkit eval` of a train/ + test/ folder scores test/
        if train_dir is None and not evaluate_only:
            raise DataError(f"{_shown(folder, shown_as)}: {val_dir.name if val_dir else test_dir.name}/ but no train/ "
                            "folder of class folders to train on (expected train/<class>/<image>)")
        held = None
        if evaluate_only and val_dir is not None and (not val_split or train_dir is None):  # the val/ folder alone
            # its classes beside the training folder's: those keep their positions, for a checkpoint without names
            train = None
            class_names = sorted(set(_class_folders(train_dir, shown_as) if train_dir else []) |
                                 set(_class_folders(val_dir, shown_as)))
        else:
            train, skipped = _folder(train_dir, preload, cache_dir, shown_as=shown_as, skip_empty=evaluate_only)
            class_names = train.class_names
        if len(class_names) < 2 and not evaluate_only:
            raise DataError(f"{_shown(train_dir, shown_as)}: one class folder ({class_names[0]}) only; "
                            "training needs at least two (expected <class>/<image> for each class)")
        if val_dir is not None:
            held, more = _folder(val_dir, preload, cache_dir, like=class_names, shown_as=shown_as,
                                 skip_empty=evaluate_only)
            skipped += more
            held_name = f"the {val_dir.name}/ folder"
    class_names = train.class_names if train is not None else class_names
    # preload drops unreadable images before a held-out fraction is drawn: an evaluation must read them alike
    split = {"path": spec, "val_split": 0.0, "split_seed": split_seed, "preload": preload}
    if Path(spec).is_file():  # an archive is recognised by name and size wherever it is later (vitkit eval)
        split["bytes"] = Path(spec).stat().st_size
    if spec not in BUILTIN:  # a relative path means another place from another working directory
        split["resolved"] = str(Path(spec).resolve())
    if val is not None:  # a separate validation dataset, classes matched by name
        _warn_overlap(spec if spec in BUILTIN or shown_as is not None else train_dir or spec, val)
        other = open_data(val, root=root, preload=preload, cache_dir=cache_dir, evaluate_only=True)
        held = _relabel(other.val, other.class_names, class_names, val)
        skipped += other.skipped
        held_name, split["val"] = f"{val} ({other.val_name})", val  # eval of the training data then warns
    elif val_split > 0 and spec not in BUILTIN and held is not None:  # a val/ folder is the validation set
        log.info("%s: validating on %s; data.val_split applies to data without one", spec, held_name)
    elif val_split > 0:  # carved out of train (a builtin's test split stays unseen)
        train_idx, val_idx = stratified_split(train.labels, val_split, split_seed)
        if not len(val_idx):
            raise DataError(f"{spec}: a held-out fraction of {val_split} (--val-split, data.val_split) is no image "
                            f"at all of {len(train)}; raise it or give --val-data")
        if not len(train_idx) and not evaluate_only:
            raise DataError(f"{spec}: a held-out fraction of {val_split} (--val-split, data.val_split) leaves none "
                            f"of its {len(train)} images to train on; lower it or give --val-data")
        labels = torch.as_tensor(train.labels)
        if not evaluate_only and (gone := sorted(set(labels.tolist()) - set(labels[train_idx].tolist()))):
            listed = ", ".join(class_names[c] for c in gone[:5]) + (f" and {len(gone) - 5} more" * (len(gone) > 5))
            log.warning("%s: a held-out fraction of %g (--val-split) leaves no training image of class%s %s",
                        spec, val_split, "es" if len(gone) > 1 else "", listed)
        train, held = Subset(train, train_idx.tolist()), Subset(train, val_idx.tolist())
        split["val_split"] = val_split
        if held_files := fingerprint(held):  # eval and --resume check that they draw this split again
            split["held_out"] = held_files
        held_name = f"held-out {val_split:.0%} (seed {split_seed})"
    if held is None and not evaluate_only and spec not in BUILTIN:
        log.info("%s: no validation (no val/ folder; --val-split 0.1 holds out a tenth, --val-data names other data)",
                 spec)
    if evaluate_only:  # evaluate the held-out part if there is one, else everything
        return Data(None, train if held is None else held, class_names, name, split, skipped, held_name)
    return Data(train, held, class_names, name, split, skipped, held_name if held is not None else "")


def _warn_overlap(data: str | Path, val: str) -> None:
    """Validating on training images picks the "best" checkpoint by how well it memorised them: say so. `data`:
    the folder trained on (a train/ + val/ folder's train/), or the archive."""
    if str(data) in BUILTIN or val in BUILTIN or is_shards(str(data)) or is_shards(val):
        return
    try:
        a, b = Path(data).resolve(), Path(val).resolve()
    except (OSError, RuntimeError):
        return
    if a == b or a in b.parents or b in a.parents:
        log.warning("--val-data %s %s the training data %s: the validation images are training images, so the "
                    "best checkpoint is the one that memorised them best", val,
                    "is" if a == b else "lies within" if a in b.parents else "holds", data)


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, val indices): the same fraction of every class held out, reproducibly."""
    labels = torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        held[idx[torch.randperm(len(idx), generator=g)[: round(len(idx) * fraction)]]] = True
    return (~held).nonzero().flatten(), held.nonzero().flatten()


def _labelled(ds: Dataset, class_names: list[str]) -> Dataset:
    ds.class_names = class_names
    return ds


def _builtin(name: str, root: str | None, cache_dir: str | None) -> tuple[Dataset, Dataset | None]:
    if name == "digits":  # 1797 8x8 grey images with values 0..16, as RGB uint8
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.from_numpy(np.rint(d.images * (255 / 16)).astype(np.uint8))[:, None].repeat(1, 3, 1, 1)
        return _labelled(TensorImages(x, torch.from_numpy(d.target).long()), [str(i) for i in range(10)]), None
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    root = Path(root or cache_root(cache_dir) / "datasets")
    existed = root.exists()
    out = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=False)
        except RuntimeError:
            try:
                ds = cls(str(root), train=train, download=True)
            except Exception as e:
                if not existed:  # the download made it: leave nothing behind
                    shutil.rmtree(root, ignore_errors=True)
                if (root / cls.base_folder).is_dir():  # there, but torchvision's checksums fail
                    raise DataError(f"{name}: {root / cls.base_folder} is there but its files fail torchvision's "
                                    f"integrity check (corrupt or incomplete), and a fresh copy could not be "
                                    f"downloaded ({type(e).__name__}); replace that folder") from None
                raise DataError(f"{name}: not found under {root} and could not be downloaded ({type(e).__name__}); "
                                f"name a folder holding {cls.base_folder}/ (vitkit train: --set data.root=DIR, "
                                "vitkit eval: --data-root DIR)") from None
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        out.append(_labelled(TensorImages(images, torch.tensor(ds.targets)), list(ds.classes)))
    return out[0], out[1]  # the official test split: what `vitkit eval` scores unless a split is asked for


def _extract(archive: Path, cache_dir: str | None) -> Path:
    """A .tar/.tar.gz extracted once into the cache, keyed by the archive's content hash."""
    if not tarfile.is_tarfile(archive):
        raise DataError(f"{archive}: not a directory or a .tar/.tar.gz archive")
    h = hashlib.blake2b(digest_size=12)
    with open(archive, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    dest = cache_root(cache_dir) / f"extracted-v2-{h.hexdigest()}"  # (v2: archives read to their end)
    if not dest.is_dir():
        _extract_to(archive, dest)
    if (dest / LEFT_OUT).is_file():
        refused = (dest / LEFT_OUT).read_text(encoding="utf-8", errors="surrogateescape").splitlines()
        log.warning("%s: %d member%s left out, e.g. %s", archive, len(refused), "s" * (len(refused) > 1), refused[0])
    return dest


def _extract_to(archive: Path, dest: Path) -> None:
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".extract-"))
    try:
        refused: list[str] = []

        def safe(member: tarfile.TarInfo, path: str):  # no absolute paths, links out of the tree, devices
            try:
                return tarfile.data_filter(member, path)
            except tarfile.FilterError as e:  # that member alone is left out, said below
                refused.append(f"{member.name} ({e})")
                return None

        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter=safe)
            read_to_the_end(tar)
        if refused:  # kept beside the files (a hidden name: not walked), said again whenever the copy is used
            (tmp / LEFT_OUT).write_text("\n".join(refused), encoding="utf-8", errors="surrogateescape")
        os.replace(tmp, dest)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:  # (zlib: a damaged .gz stream)
        if not dest.is_dir():  # else another process (a DDP rank) finished first
            raise DataError(f"{archive}: not a readable .tar/.tar.gz archive ({str(e).splitlines()[0]})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_to_the_end(tar: tarfile.TarFile) -> None:
    """ReadError unless the archive read so far ended as a whole one does. tarfile takes a damaged member header
    for the end of the archive, and a .tar.gz's checksum is only read at its end: so what follows the last
    member must be tar's end-of-archive block of zeros, and a compressed stream must decompress to its end."""
    f = tar.fileobj
    f.seek(tar.offset)  # (a .tar.gz decompresses again from the start to get there: once per archive)
    block = f.read(tarfile.BLOCKSIZE)
    if block.strip(b"\0") or len(block) < tarfile.BLOCKSIZE:
        where = f"after member {len(tar.getmembers())} ({tar.getmembers()[-1].name})" if tar.getmembers() else \
            "at its start"
        raise tarfile.ReadError(f"damaged or truncated {where}: " + (
            "a member header that cannot be read" if block.strip(b"\0") else "no end-of-archive marker"))
    while f.read(1 << 22):  # gzip checks its CRC and length at the end (BadGzipFile, EOFError)
        pass


def _subdirs(folder: Path) -> list[Path]:
    return [e for e in folder.iterdir() if e.is_dir() and not is_junk(e.name)]


SPLITS = ("train", "val", "validation", "valid", "test")


def _layout(folder: Path, shown_as=None) -> tuple[Path | None, Path | None, Path | None]:
    """(train, val, test folder; None when absent). A wrapper folder (the only folder beside files such as a
    README or macOS debris, with no images of its own) is looked through when it holds folders itself: a folder
    whose only class folder holds the images is that one class. `train/` is the training split only when it holds
    class folders (CIFAR-100 has a class named "train"); val/ and test/ without train/ are splits too (to evaluate).
    Training never looks at test/."""
    while True:
        dirs = {e.name.lower(): e for e in _subdirs(folder)}
        val = next((dirs[n] for n in ("val", "validation", "valid") if n in dirs and _subdirs(dirs[n])), None)
        test = dirs["test"] if "test" in dirs and _subdirs(dirs["test"]) else None
        if ("train" in dirs and _subdirs(dirs["train"])) or (dirs and set(dirs) <= set(SPLITS) and (val or test)):
            train = dirs.get("train") if "train" in dirs and _subdirs(dirs["train"]) else None
            if other := sorted(e.name for e in dirs.values() if e not in (train, val, test)):
                log.warning("%s: beside %s/, %s ignored", _shown(folder, shown_as), (train or val or test).name,
                            ", ".join(f"{o}/" for o in other))
            return train, val, test
        if dirs and set(dirs) <= set(SPLITS):  # train/, val/ holding images directly: not classes
            raise DataError(f"{_shown(folder, shown_as)}: {', '.join(sorted(f'{d}/' for d in dirs))} hold images, not "
                            "class folders: expected train/<class>/<image> (and val/<class>/<image>), or one folder "
                            "per class")
        if len(dirs) == 1 and _subdirs(only := next(iter(dirs.values()))) and not _has_images(only):
            folder = only
            continue
        return folder, None, None


def _has_images(folder: Path) -> bool:
    return any(e.is_file() and e.suffix.lower() in image_suffixes() and not is_junk(e.name) for e in folder.iterdir())


def _class_folders(root: Path, shown_as=None) -> list[str]:
    if not (classes := sorted(d.name for d in _subdirs(root))):
        where = _shown(root, shown_as)
        shard = shown_as is not None and any(root.glob("*.cls"))
        raise DataError(f"{where}: no class folders (expected {where}/<class>/<image>)" + (
            f"; it looks like one WebDataset shard: name shards with a brace range, e.g. '{_brace(shown_as[1])}'"
            if shard else ""))
    return classes


def _brace(archive: str) -> str:
    """A one-shard brace pattern for a shard's name: val-000003.tar -> val-{000003..000003}.tar."""
    import re

    name = archive.rstrip(":")
    m = re.fullmatch(r"(.*?)(\d+)(\.tar(?:\.gz)?)", name)
    return f"{m[1]}{{{m[2]}..{m[2]}}}{m[3]}" if m else "train-{000000..000000}.tar"


def _folder(root: Path, preload, cache_dir: str | None, like: list[str] | None = None,
            shown_as: tuple[str, str] | None = None, skip_empty: bool = False) -> tuple[Dataset, list[str]]:
    """An ImageFolder (one subfolder per class). `like`: the training classes these must be among. skip_empty:
    an empty class folder is left out with a warning (evaluating: scored on the other classes), not an error."""
    where = _shown(root, shown_as)
    classes = _class_folders(root, shown_as)
    if _has_images(root):  # beside the class folders: no class to give them
        log.warning("%s: images beside its class folders are not used (they belong in a <class>/ folder)", where)
    if like is not None and (extra := sorted(set(classes) - set(like))):
        raise DataError(f"{where}: classes {extra[:5]} are not among the training classes{_case_hint(extra, like)}")
    index = {c: i for i, c in enumerate(like or classes)}
    per_class = {}
    for c in classes:
        if not (files := image_files(root / c)):
            if not skip_empty:
                raise DataError(f"{_shown(root / c, shown_as)}: empty class folder (no image files)")
            log.warning("%s: empty class folder (no image files), left out", _shown(root / c, shown_as))
            continue
        per_class[c] = files
    if not per_class:
        raise DataError(f"{where}: every class folder is empty (no image files)")
    paths = [f for files in per_class.values() for f in files]
    labels = [index[c] for c, files in per_class.items() for _ in files]
    files_ds = _labelled(FileImages(paths, labels, shown_as), like or classes)
    files_ds.names = [p.relative_to(root).as_posix() for p in paths]  # which files: see fingerprint
    if preload is True or (preload == "auto" and _small(paths)):
        if (decoded := _preload(files_ds, root, where, cache_dir)) is not None:
            return decoded
        log.info("%s: images of several sizes, so read as needed (each its own size)", where)
    # decoded on demand, so a class none of whose files is an image must be caught here
    if unreadable := [c for c, files in per_class.items() if not _any_opens(files)]:
        raise DataError(_no_readable([_shown(root / c, shown_as) for c in unreadable]))
    return files_ds, []


def _any_opens(paths: list[Path]) -> bool:
    """Whether one of the files decodes as an image (the first one, where the class is sound: one image a class)."""
    for p in paths:
        try:
            load_image(p)
            return True
        except ImageError:
            continue
    return False


def _no_readable(classes: list[str]) -> str:
    """`classes`: the class folders as messages name them."""
    more = f" (nor those of {len(classes) - 1} more classes)" if len(classes) > 1 else ""
    return f"{classes[0]}: none of its images is readable{more}"


def _shown(path: Path, shown_as: tuple[str, str] | None) -> str:
    """A path as messages name it: inside an archive, by its place there ("data.tar.gz:train/cat")."""
    text = f"{path}{os.sep}"
    return text.replace(*shown_as, 1).rstrip(os.sep + ":") if shown_as else str(path)


def _small(paths: list[Path]) -> bool:
    for p in paths[:8]:  # the first readable one decides
        try:
            with Image.open(p) as im:
                return im.width * im.height <= PRELOAD_MAX_PIXELS
        except Exception:
            continue
    return False


class _Decode(Dataset):
    def __init__(self, files: FileImages, size: tuple[int, int]):
        self.files, self.size = files, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            img = self.files[i][0]
        except ImageError as e:
            return None, str(e)
        if img.size != self.size:  # not preloaded then: a placeholder of the right shape, flagged
            return torch.zeros(3, self.size[1], self.size[0], dtype=torch.uint8), (i, 0)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), (i, 1)


def _preload(files: FileImages, root: Path, where: str, cache_dir: str | None) -> tuple[Dataset, list[str]] | None:
    """Decode every image once into a uint8 tensor (cached on disk, keyed by the folder and the files' names,
    sizes and times). None when the images are not all of one size: one tensor would squash them."""
    h = hashlib.blake2b(digest_size=12)
    h.update(b"preload 3: upright\n")  # version 1 squashed images of several sizes into one; 2 ignored EXIF
    # orientation
    h.update(os.fsencode(f"{root.resolve()}\n"))  # fsencode: a file name need not be valid UTF-8
    for p, label in zip(files.paths, files.labels.tolist()):
        st = p.stat() if p.exists() else p.lstat()  # a broken symlink: read, and listed as unreadable
        h.update(os.fsencode(f"{p.relative_to(root)}|{label}|{st.st_size}|{st.st_mtime_ns}\n"))
    cache = cache_root(cache_dir) / f"preload-{h.hexdigest()}.pt"
    if cache.is_file():
        d = torch.load(cache, weights_only=True)
    else:
        size = next((img.size for i in range(len(files)) if (img := _try(files, i)) is not None), None)
        if size is None:
            raise DataError(f"{where}: none of the {len(files)} image files is readable")
        raw = FileImages(files.paths, files.labels.tolist())  # messages name the files as found here
        loader = torch.utils.data.DataLoader(_Decode(raw, size), batch_size=500, collate_fn=collate,
                                             num_workers=min(4, os.cpu_count() or 1), worker_init_fn=worker_init)
        images, keep, skipped, one_size = [], [], [], True
        for x, index, bad in loader:
            skipped += bad
            if x is not None:
                images.append(x), keep.append(index[:, 0])
                one_size &= bool(index[:, 1].all())
        kept = torch.cat(keep)
        d = {"images": torch.cat(images), "labels": files.labels[kept], "skipped": skipped,
             "names": "\0".join(files.names[i] for i in kept.tolist())} \
            if one_size else {"several_sizes": True}
        with replacing(cache) as tmp:
            torch.save(d, tmp)
    if "several_sizes" in d:
        return None
    unreadable = sorted(set(files.labels.tolist()) - set(d["labels"].tolist()))
    if unreadable:  # as unusable as an empty class folder
        raise DataError(_no_readable([_shown(root / files.class_names[i], files.shown_as) for i in unreadable]))
    shown = [m.replace(*files.shown_as, 1) for m in d["skipped"]] if files.shown_as else list(d["skipped"])
    decoded = _labelled(TensorImages(d["images"], d["labels"]), files.class_names)
    # one string (a list of 50,000 names loads 20x slower); caches written before names were kept: None
    decoded.names = d["names"].split("\0") if isinstance(d.get("names"), str) else None
    return decoded, shown


def _try(files: FileImages, i: int):
    try:
        return files[i][0]
    except ImageError:
        return None


def fingerprint(ds: Dataset | None) -> str | None:
    """Which image files `ds` (or a Subset's part of it) holds, as a short hash of their names; None where files
    are not named (the builtins, shards). A held-out split drawn again from changed data differs."""
    indices = None
    if isinstance(ds, Subset):
        indices, ds = ds.indices, ds.dataset
    if (names := getattr(ds, "names", None)) is None:
        return None
    chosen = sorted(names[i] for i in indices) if indices is not None else sorted(names)
    return hashlib.blake2b("\n".join(chosen).encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()


def _present(ds: Dataset, names: list[str]) -> list[str]:
    """The classes `ds` has images of, where its labels are at hand (else all of `names`)."""
    if isinstance(ds, Subset) and hasattr(ds.dataset, "labels"):
        labels = torch.as_tensor(ds.dataset.labels)[torch.as_tensor(ds.indices, dtype=torch.long)]
    elif hasattr(ds, "labels"):
        labels = torch.as_tensor(ds.labels)
    elif isinstance(ds, ShardStream) and ds.labels_seen is not None:
        labels = torch.as_tensor(ds.labels_seen, dtype=torch.long)
    else:
        return names
    return [names[i] for i in labels.unique().tolist()]


def _relabel(ds: Dataset, names: list[str], target: list[str], source: str) -> Dataset:
    """Labels of `ds` (classes `names`) renumbered into `target`'s classes, matched by name; a class without images
    here (a train/ class the val/ folder lacks) need not be among them."""
    missing = sorted(set(_present(ds, names)) - set(target))
    if missing:
        raise DataError(f"{source}: classes {missing[:5]}{' ...' if len(missing) > 5 else ''} are not among the "
                        f"{len(target)} classes {target[:5]}{' ...' if len(target) > 5 else ''}"
                        f"{_case_hint(missing, target)}")
    if names == target[: len(names)]:
        return ds
    mapping = torch.tensor([target.index(n) if n in target else -1 for n in names])  # -1: no image has it
    if isinstance(ds, ShardStream):
        ds.label_map = mapping
        return ds
    return _Relabelled(ds, mapping)


def _case_hint(missing: list[str], known: list[str]) -> str:
    folded = {k.casefold(): k for k in known}
    pairs = [f"{m} / {folded[m.casefold()]}" for m in missing if m.casefold() in folded]
    return f" (names are matched exactly, case included: {', '.join(pairs[:3])})" if pairs else ""


class _Relabelled(Dataset):
    def __init__(self, base: Dataset, mapping: torch.Tensor):
        self.base, self.mapping = base, mapping

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, label = self.base[i]
        return img, int(self.mapping[label])


def relabel(data: Data, target: list[str]) -> Data:
    """Renumber the evaluation set's labels into `target` (a checkpoint's classes), matched by name."""
    data.val = _relabel(data.val, data.class_names, target, data.name)
    return data


# --- WebDataset shards ----------------------------------------------------------------------------------
def _shards(spec: str, val: str | None, val_split: float, opts: dict, evaluate_only: bool) -> Data:
    urls = _expand(spec)
    missing = [u for u in urls if "://" not in u and not Path(u).is_file()]
    if missing:
        raise DataError(f"{spec}: {len(missing)} of {len(urls)} shards missing, e.g. {missing[0]}")
    if val_split and val is None:
        raise DataError(f"{spec}: --val-split (data.val_split) needs an indexed dataset, not a stream of shards; "
                        "give held-out shards with --val-data (data.val)")
    names_file = Path(urls[0]).parent / "classes.txt"
    sizes, labels = (None, None) if opts.get("epoch_size") else _count(urls, spec)
    count = opts.get("epoch_size") or sum(sizes)
    if names_file.is_file():
        class_names = _class_list(names_file)
        if labels and labels[-1] >= len(class_names):
            raise DataError(f"{spec}: label {labels[-1]} in the shards, but {names_file} names "
                            f"{len(class_names)} classes (labels 0..{len(class_names) - 1})")
    elif labels:
        if max(labels) + 1 > max(10, 2 * len(labels)):  # mostly unseen classes: a typo'd label, or names missing
            raise DataError(f"{spec}: labels up to {max(labels)} but only {len(labels)} different ones; name the "
                            f"classes in {names_file} (one per line, in label order) to say how many there are")
        class_names = [str(i) for i in range(max(labels) + 1)]
    else:
        raise DataError(f"{spec}: put the class names in {names_file} (one per line, in label order)")
    if labels is not None and len(labels) < 2 and not evaluate_only:
        raise DataError(f"{spec}: every sample has label {labels[0]} ({class_names[labels[0]]}); training needs "
                        "at least two classes")
    stream = ShardStream(urls, count, shuffle_buffer=opts.get("shuffle_buffer", 2000), shard_sizes=sizes)
    val_urls = _expand(val) if val else None
    val_sizes = None
    if val and not is_shards(val):
        raise DataError(f"{val}: the validation data (--val-data, data.val) of WebDataset shards must be shards "
                        "too, named with a brace range ('val-{000000..000009}.tar')")
    if val:
        if missing := [u for u in val_urls if "://" not in u and not Path(u).is_file()]:
            raise DataError(f"{val}: {len(missing)} of {len(val_urls)} shards missing, e.g. {missing[0]}")
        val_sizes, val_labels = _count(val_urls, val)
        val_names_file = Path(val_urls[0]).parent / "classes.txt"
        val_names = class_names  # the validation shards' labels are the training shards' unless they name theirs
        if val_names_file.is_file() and val_names_file.resolve() != names_file.resolve():
            val_names = _class_list(val_names_file)
        if val_labels and val_labels[-1] >= len(val_names):
            raise DataError(f"{val}: label {val_labels[-1]} in the shards, but {len(val_names)} classes "
                            f"({val_names_file if val_names is not class_names else 'those of the training data'})")
    stream.num_classes, stream.labels_seen = len(class_names), labels  # (counted labels are checked above; with
    # data.epoch_size, read ones)
    held = ShardStream(val_urls, sum(val_sizes), shuffle_buffer=0, shard_sizes=val_sizes) if val else None
    if held is not None:
        held.num_classes, held.labels_seen = len(val_names), val_labels
    if val and val_names is not class_names:  # matched by name, as a folder's classes are
        held = _relabel(held, val_names, class_names, val)
    data = Data(stream, held, class_names, spec, {"path": spec, "val_split": 0.0, "split_seed": 0,
                                                  **({"val": val} if val else {})}, val_name=val or "")
    if evaluate_only:
        data.train, data.val = None, held or ShardStream(urls, count, shuffle_buffer=0, shard_sizes=sizes)
        if data.val.num_classes is None:
            data.val.num_classes, data.val.labels_seen = len(class_names), labels
        data.val_name = val or "all"
    return data


def _expand(pattern: str) -> list[str]:
    import webdataset as wds

    try:
        return wds.shardlists.expand_urls(pattern)
    except ValueError as e:  # braceexpand's UnbalancedBracesError
        raise DataError(f"{pattern}: not a shard pattern ({e}); name shards with a brace range, e.g. "
                        "'shards-{000000..000009}.tar'") from None


def _count(urls: list[str], spec: str) -> tuple[list[int], list[int]]:
    """Samples per shard and the labels, of local shards (one pass over the archives). A shard that cannot be
    read, a label that is not a class index, or shards without one labelled image that decodes are a DataError."""
    sizes, labels, decodes = [], set(), False
    images = {s[1:] for s in image_suffixes()}
    for u in urls:
        sizes.append(0)
        try:
            with tarfile.open(u) as tar:
                for m in tar:
                    base = m.name.rsplit("/", 1)[-1]
                    if not decodes and m.isfile() and base.rsplit(".", 1)[-1].lower() in images:
                        decodes = _decodes(tar.extractfile(m).read())  # until one does: the first, normally
                    if m.name.endswith(".cls"):
                        if base.count(".") > 1:  # WebDataset's key ends at the first dot: these samples would merge
                            raise DataError(f"{u}:{m.name}: a sample name with a dot in it; WebDataset takes "
                                            f"{base.split('.')[0]!r} as its key, so such samples run together "
                                            f"(name them like {base.split('.')[0]}_{'_'.join(base.split('.')[1:-1])}"
                                            f".cls)")
                        raw = tar.extractfile(m).read()
                        try:
                            label = int(raw)
                        except ValueError:
                            label = -1
                        if label < 0:
                            raise DataError(f"{u}:{m.name}: label {raw[:20]!r} is not a class index (an integer "
                                            ">= 0; class names go in classes.txt beside the shards)")
                        sizes[-1] += 1
                        labels.add(label)
                read_to_the_end(tar)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            why = (str(e) if isinstance(e, tarfile.ReadError) and str(e).startswith("damaged") else
                   "truncated, or not a .tar archive") if isinstance(e, (tarfile.TarError, EOFError)) else \
                (getattr(e, "strerror", None) or str(e))
            raise DataError(f"{u}: not a readable shard ({why})") from None
    if not sum(sizes):
        raise DataError(f"{spec}: no sample has a class label: a WebDataset sample is <key>.jpg (or .png, ...) with "
                        "<key>.cls holding its class index; class names go in classes.txt beside the shards")
    if not decodes:
        raise DataError(f"{spec}: none of its images is readable")
    return sizes, sorted(labels)


def _decodes(data: bytes) -> bool:
    try:
        decode(io.BytesIO(data), "")
        return True
    except ImageError:
        return False


def _class_list(path: Path) -> list[str]:
    """classes.txt beside shards: one class name a line, in label order."""
    try:
        return [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


class ShardStream(IterableDataset):
    """Samples of WebDataset shards, each decoded and transformed. For training, `configure` sets the epoch
    (shard order and shuffle are seeded by it), the process's rank and whether to repeat the shards so
    that every rank can take the same number of batches."""

    def __init__(self, urls: list[str], size: int | None, shuffle_buffer: int, shard_sizes: list[int] | None = None):
        self.urls, self.size, self.shuffle_buffer = urls, size, shuffle_buffer
        self.shard_sizes = dict(zip(urls, shard_sizes)) if shard_sizes else {}  # unknown: taken as equal
        self.label_map: torch.Tensor | None = None  # labels renumbered into a checkpoint's classes
        self.num_classes: int | None = None  # labels outside 0..num_classes-1 are skipped as bad samples
        self.labels_seen: list[int] | None = None  # the labels the shards hold, where they were counted
        self.transform, self.seed, self.epoch, self.rank, self.world, self.repeat = None, None, 0, 0, 1, False
        self.batch = 1

    def __len__(self):
        return self.size or 0

    def configure(self, transform, seed=None, epoch=0, rank=0, world=1, repeat=False, batch=1) -> "ShardStream":
        """`batch`: the DataLoader's batch size, which takes batches from its workers in turn."""
        self.transform, self.seed, self.epoch, self.rank, self.world, self.repeat, self.batch = \
            transform, seed, epoch, rank, world, repeat, batch
        return self

    def __iter__(self):
        import webdataset as wds

        worker = get_worker_info()
        wid, nworkers = (worker.id, worker.num_workers) if worker else (0, 1)
        part, parts = self.rank * nworkers + wid, self.world * nworkers
        urls = list(self.urls)
        if self.seed is not None:
            random.Random(hash((self.seed, self.epoch))).shuffle(urls)
        mine = self._share(urls, parts)
        by_shard = mine is not None  # each reader its own shards, else every reader keeps every n-th sample
        if by_shard:
            urls = [u for u in urls if u in mine[part]]
        failed: list[str] = []  # shards that broke off (read for the first time with data.epoch_size): reported
        # as skipped items, in the run's list of unreadable files, not as webdataset's raw warnings

        def broken(e: Exception) -> bool:
            url = next((a for a in reversed(e.args) if isinstance(a, str) and a in self.urls), "a shard")
            why = str(e.args[0]).split(" @ ")[0] if e.args else type(e).__name__  # (webdataset appends " @ file")
            failed.append(f"{url}: not a readable shard ({why}); the rest of it is skipped")
            return True  # go on with the next shard

        ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False,
                            handler=broken)
        if self.repeat:  # WebDataset(repeat=True) reads the shards once (webdataset 1.0); .repeat() cycles them
            ds = ds.repeat()
        if self.seed is not None and self.shuffle_buffer > 1:
            # reading every n-th sample needs one order on all readers: the same seed
            ds = ds.shuffle(self.shuffle_buffer, rng=random.Random(hash((self.seed, self.epoch,
                                                                         part if by_shard else -1))))
        for n, sample in enumerate(ds):
            while failed:
                yield None, failed.pop()
            # every reader sees one order: consecutive batches go to the ranks in turn, and each rank's to its
            # loader workers in turn, as the DataLoader then asks for them (an epoch reads no sample twice)
            j = n // self.batch
            if not by_shard and (j % self.world != self.rank or j // self.world % nworkers != wid):
                continue
            yield self._decode(sample, (part, n) if by_shard else (n,))  # each sample its own random draws
        while failed:  # (the last shard's)
            yield None, failed.pop()

    def _share(self, urls: list[str], parts: int) -> list[set[str]] | None:
        """Shards per reader, dealt largest first to the reader with the fewest samples so far. None when the
        least loaded reader would get under 80% of the most loaded one's samples (fewer shards than readers, or
        sizes too uneven): a reader short of samples repeats its own while others' are left unread, so then
        every reader reads all shards instead (more reading, one epoch of every sample)."""
        if len(urls) < parts:
            return None
        loads, mine = [0] * parts, [set() for _ in range(parts)]
        for u in sorted(urls, key=lambda u: -self.shard_sizes.get(u, 1)):
            i = loads.index(min(loads))
            loads[i] += self.shard_sizes.get(u, 1)
            mine[i].add(u)
        return mine if min(loads) >= 0.8 * max(loads) else None

    def _decode(self, sample: dict, n: tuple[int, ...]):
        key = next((k for k in sample if k.lower() in {s[1:] for s in image_suffixes()}), None)
        where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        try:
            if key is None:
                raise ImageError(f"{where}: no image in sample")
            if "cls" not in sample:
                raise ImageError(f"{where}: no .cls label in sample")
            if not sample[key]:
                raise ImageError(f"{where}: empty file")
            label = int(sample["cls"])
            if self.num_classes is not None and not 0 <= label < self.num_classes:
                raise ImageError(f"{where}: label {label} is not one of the {self.num_classes} classes "
                                 f"(0..{self.num_classes - 1})")
            label = label if self.label_map is None else int(self.label_map[label])
            img = decode(io.BytesIO(sample[key]), where)[0]
        except ValueError as e:  # ImageError, or a .cls that is not a number
            return None, str(e) if isinstance(e, ImageError) else f"{where}: .cls is not a class number ({e})"
        try:
            if self.seed is None:
                return self.transform(img), label
            with seeded(self.seed, self.epoch, *n):
                return self.transform(img), label
        except ImageError as e:  # eval_transform's: too elongated to resize
            return None, f"{where}: {e}"


def in_memory(ds: Dataset) -> bool:
    """Whether the images are decoded already (then loader worker processes only cost)."""
    while isinstance(ds, (Subset, _Relabelled, Transformed)):
        ds = ds.dataset if isinstance(ds, Subset) else ds.base
    return isinstance(ds, TensorImages)


def describe(data: Data) -> str:
    parts = [f"{len(ds)} {what}" for ds, what in ((data.train, "train"), (data.val, "val")) if ds is not None]
    return f"{data.name}: {len(data.class_names)} classes, {' / '.join(parts)} images"

