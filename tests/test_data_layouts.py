"""DATA layouts found in the wild: a folder of one class, a class named "train", archives with a README or macOS
debris beside the data, broken shards, and a run's data named by a relative path."""
from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import pytest
import torch

from vitkit.data.datasets import DataError, in_memory, open_data
from vitkit.data.images import ImageError
from vitkit.train import evaluate as E

from train_utils import digit_images


def test_a_folder_holding_one_class_is_evaluated_and_refused_for_training(tmp_path):
    digit_images(tmp_path / "one", ["3"], per_class=12)
    data = open_data(str(tmp_path / "one"), evaluate_only=True, cache_dir=str(tmp_path / "cache"))
    assert data.class_names == ["3"] and len(data.val) == 12
    with pytest.raises(DataError, match="one class folder"):
        open_data(str(tmp_path / "one"), cache_dir=str(tmp_path / "cache"))


def test_a_class_named_train_is_a_class(tmp_path):
    """CIFAR-100 has a class "train": its folder holds images, not the class folders of a train/ split."""
    digit_images(tmp_path / "ds", ["1", "2"], per_class=6)
    (tmp_path / "ds" / "1").rename(tmp_path / "ds" / "bus")
    (tmp_path / "ds" / "2").rename(tmp_path / "ds" / "train")
    data = open_data(str(tmp_path / "ds"), val_split=0.5, cache_dir=str(tmp_path / "cache"))
    assert data.class_names == ["bus", "train"] and (len(data.train), len(data.val)) == (6, 6)


def test_archive_with_a_readme_and_macos_debris(tmp_path):
    """mydata/ beside README.txt and __MACOSX/ is the dataset; AppleDouble ._x.png files are not images."""
    digit_images(tmp_path / "a" / "mydata", ["1", "2"], per_class=6)
    (tmp_path / "a" / "README.txt").write_text("digits")
    (tmp_path / "a" / "__MACOSX" / "mydata" / "1").mkdir(parents=True)
    for junk in (tmp_path / "a" / "__MACOSX" / "mydata" / "1" / "._0001.png", tmp_path / "a" / "mydata" / "1" / "._x.png",
                 tmp_path / "a" / "mydata" / ".DS_Store"):
        junk.write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    with tarfile.open(tmp_path / "a.tar.gz", "w:gz") as tar:
        for name in ("README.txt", "__MACOSX", "mydata"):
            tar.add(tmp_path / "a" / name, arcname=name)
    data = open_data(str(tmp_path / "a.tar.gz"), val_split=0.5, cache_dir=str(tmp_path / "cache"))
    assert data.class_names == ["1", "2"] and (len(data.train), len(data.val)) == (6, 6)
    assert data.skipped == []


def _shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("label, names, expected", [
    (b"cat", None, "is not a class index"),
    (b"-1", None, "is not a class index"),
    (b"7", "a\nb\n", "label 7 in the shards, but"),
])
def test_shard_labels_that_are_no_class_index_stop_before_any_work(tmp_path, label, names, expected):
    png = (next(iter(digit_images(tmp_path / "img", ["1"], per_class=1).values()))[0]).read_bytes()
    _shard(tmp_path / "s-0.tar", [("a.png", png), ("a.cls", b"0"), ("b.png", png), ("b.cls", label)])
    if names:
        (tmp_path / "classes.txt").write_text(names)
    with pytest.raises(DataError, match=expected):
        open_data(str(tmp_path / "s-{0..0}.tar"))


def test_an_unreadable_shard_is_one_clear_error(tmp_path):
    png = (next(iter(digit_images(tmp_path / "img", ["1"], per_class=1).values()))[0]).read_bytes()
    _shard(tmp_path / "s-0.tar", [(f"{i}.png", png) if j == 0 else (f"{i}.cls", b"0") for i in range(20) for j in (0, 1)])
    (tmp_path / "s-1.tar").write_bytes((tmp_path / "s-0.tar").read_bytes()[:3000])  # cut off mid-member
    with pytest.raises(DataError, match=r"s-1.tar: not a readable shard"):
        open_data(str(tmp_path / "s-{0..1}.tar"))


def test_recorded_split_names_the_same_folder_from_any_working_directory(tmp_path, monkeypatch):
    digit_images(tmp_path / "a" / "ds", ["1", "2"], per_class=5)
    digit_images(tmp_path / "b" / "ds", ["1", "2"], per_class=5)  # another dataset of the same relative name
    monkeypatch.chdir(tmp_path / "a")
    split = open_data("ds", val_split=0.2, cache_dir=str(tmp_path / "cache")).split  # as a run records it
    monkeypatch.setattr("vitkit.weights.vitkit_format.read_metadata", lambda path: {"data": split})
    weights = str(tmp_path / "run" / "best.safetensors")
    monkeypatch.chdir(tmp_path)
    assert E.recorded_split(weights, "a/ds") == split  # the run's data, named from elsewhere
    monkeypatch.chdir(tmp_path / "b")
    assert E.recorded_split(weights, "ds") == {}  # not the run's data, though named as it was


def test_validation_shards_naming_their_classes_are_matched_by_name(tmp_path):
    """Held-out shards elsewhere with their own classes.txt (labels 0=b, 1=a): renumbered into the training
    shards' classes (a, b, c), as a folder's classes are; a folder as --val-data of shards: one clear error."""
    png = (next(iter(digit_images(tmp_path / "img", ["1"], per_class=1).values()))[0]).read_bytes()
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    _shard(tmp_path / "train" / "t-0.tar", [(f"{i}.{ext}", png if ext == "png" else str(i % 3).encode())
                                            for i in range(6) for ext in ("png", "cls")])
    (tmp_path / "train" / "classes.txt").write_text("a\nb\nc\n")
    _shard(tmp_path / "val" / "v-0.tar", [(f"{i}.{ext}", png if ext == "png" else str(i % 2).encode())
                                          for i in range(4) for ext in ("png", "cls")])
    (tmp_path / "val" / "classes.txt").write_text("b\na\n")
    data = open_data(str(tmp_path / "train" / "t-{0..0}.tar"), val=str(tmp_path / "val" / "v-{0..0}.tar"))
    assert data.class_names == ["a", "b", "c"] and data.val.label_map.tolist() == [1, 0]
    labels = [y for _, y in data.val.configure(lambda im: 0)]
    assert labels == [1, 0, 1, 0]
    with pytest.raises(DataError, match="must be shards too"):
        open_data(str(tmp_path / "train" / "t-{0..0}.tar"), val=str(tmp_path / "img"))


def test_train_val_test_layouts(tmp_path, caplog):
    """train/ + valid/ validates on valid/; train/ + test/: training leaves test/ unseen (validation from
    --val-split) and `vitkit eval` scores test/, reading only its class names from train/; other folders beside
    train/ are named as ignored."""
    for split in ("train", "test"):
        digit_images(tmp_path / "tt" / split, ["1", "2"], per_class=6, offset=0 if split == "train" else 6)
    (tmp_path / "tt" / "train" / "1" / "bad.png").write_bytes(b"not a png")  # read only if train/ is read
    (tmp_path / "tt" / "extra").mkdir()
    cache = str(tmp_path / "cache")
    data = open_data(str(tmp_path / "tt"), val_split=0.5, cache_dir=cache)
    assert (len(data.train), len(data.val)) == (6, 6) and data.val_name == "held-out 50% (seed 0)"
    assert "beside train/, extra/ ignored" in caplog.text
    scored = open_data(str(tmp_path / "tt"), evaluate_only=True, cache_dir=cache)
    assert (scored.train, len(scored.val), scored.val_name, scored.skipped) == (None, 12, "the test/ folder", [])
    (tmp_path / "tt" / "test").rename(tmp_path / "tt" / "valid")
    caplog.clear()
    caplog.set_level("INFO", logger="vitkit")
    data = open_data(str(tmp_path / "tt"), val_split=0.1, cache_dir=cache)
    assert (len(data.train), len(data.val), data.val_name) == (12, 12, "the valid/ folder")
    assert "validating on the valid/ folder; data.val_split applies to data without one" in caplog.text


def test_images_of_several_sizes_are_not_squashed_into_one(tmp_path):
    """Preloading decided by the first image used to squash every image to its size (here 8x8)."""
    from PIL import Image

    digit_images(tmp_path / "mixed", ["1", "2"], per_class=2)
    for c in ("1", "2"):
        Image.new("RGB", (40, 24), "white").save(tmp_path / "mixed" / c / "zz-wide.png")
    data = open_data(str(tmp_path / "mixed"), evaluate_only=True, cache_dir=str(tmp_path / "cache"))
    sizes = sorted({tuple(data.val[i][0].size) for i in range(len(data.val))})
    assert sizes == [(8, 8), (40, 24)]
    digit_images(tmp_path / "same", ["1", "2"], per_class=2)  # one size: decoded once into memory
    assert in_memory(open_data(str(tmp_path / "same"), evaluate_only=True, cache_dir=str(tmp_path / "cache")).val)


def test_symlinked_folders_inside_a_class_are_followed(tmp_path):
    digit_images(tmp_path / "elsewhere", ["1"], per_class=3)
    digit_images(tmp_path / "ds", ["1", "2"], per_class=2)
    (tmp_path / "ds" / "1" / "more").symlink_to(tmp_path / "elsewhere" / "1")
    (tmp_path / "ds" / "1" / "loop").symlink_to(tmp_path / "ds" / "1")  # each real folder read once
    data = open_data(str(tmp_path / "ds"), evaluate_only=True, preload=False)
    assert len(data.val) == 7


@pytest.mark.parametrize("preload", [True, False])
def test_a_broken_symlink_in_a_class_folder_is_listed_as_skipped(tmp_path, preload):
    digit_images(tmp_path / "ds", ["1", "2"], per_class=3)
    (tmp_path / "ds" / "1" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    data = open_data(str(tmp_path / "ds"), evaluate_only=True, preload=preload, cache_dir=str(tmp_path / "cache"))
    message = f"{tmp_path}/ds/1/gone.png: a symbolic link to nothing (broken, or a loop)"
    if preload:  # decoded before any work: listed at once, the other six kept
        assert len(data.val) == 6 and data.skipped == [message]
    else:  # read on demand: the reader names it, for the run's list of skipped images
        assert len(data.val) == 7 and data.skipped == []
        with pytest.raises(ImageError, match="symbolic link to nothing"):
            [data.val[i] for i in range(len(data.val))]


def _cifar_root(root, monkeypatch):
    """A torchvision-format CIFAR-10 root: 5 x 4 training images, 6 test images."""
    import pickle

    import numpy as np
    from torchvision import datasets

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for name, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 6)]:
        batch = {"data": np.zeros((n, 3072), np.uint8), "labels": [i % 2 for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    monkeypatch.setattr(datasets.cifar, "check_integrity", lambda *args: True)  # no md5 of the real files


def test_cifar_test_split_is_never_validated_on_and_is_what_eval_scores(tmp_path, monkeypatch):
    _cifar_root(tmp_path, monkeypatch)
    data = open_data("cifar10", root=str(tmp_path))
    assert (len(data.train), data.val) == (20, None)
    assert len(open_data("cifar10", root=str(tmp_path), val_split=0.5).val) == 10  # carved from train
    scored = open_data("cifar10", root=str(tmp_path), evaluate_only=True)
    assert (len(scored.val), scored.val_name) == (6, "the test split")


def test_a_failed_cifar_download_leaves_no_folder_and_names_both_flags(tmp_path, monkeypatch):
    from torchvision import datasets

    def offline(self):
        (Path(self.root) / "partial").mkdir(parents=True)
        raise OSError("no network")

    monkeypatch.setattr(datasets.CIFAR10, "download", offline)
    with pytest.raises(DataError, match=r"--set data.root=DIR.*--data-root DIR"):
        open_data("cifar10", root=str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()


def test_archive_messages_name_the_archive_where_it_is_now(tmp_path):
    """Skipped images are named inside the archive as it is named now, also when the decoded images come from
    the cache an earlier run under another name wrote; a class with no readable image at the archive's top
    level is named archive:class."""
    import shutil

    digit_images(tmp_path / "d", ["1", "2"], per_class=3)
    (tmp_path / "d" / "2" / "broken.png").write_bytes(b"junk")
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        for c in ("1", "2"):
            tar.add(tmp_path / "d" / c, arcname=c)
    cache = str(tmp_path / "cache")
    assert open_data(str(tmp_path / "a.tar"), evaluate_only=True, cache_dir=cache).skipped[0].startswith(
        f"{tmp_path / 'a.tar'}:2/broken.png")
    (tmp_path / "moved").mkdir()
    shutil.move(tmp_path / "a.tar", tmp_path / "moved" / "b.tar")
    assert open_data(str(tmp_path / "moved" / "b.tar"), evaluate_only=True, cache_dir=cache).skipped[0].startswith(
        f"{tmp_path / 'moved' / 'b.tar'}:2/broken.png")
    for f in (tmp_path / "d" / "2").glob("*.png"):
        f.write_bytes(b"junk")
    with tarfile.open(tmp_path / "c.tar", "w") as tar:
        for c in ("1", "2"):
            tar.add(tmp_path / "d" / c, arcname=c)
    with pytest.raises(DataError, match=rf"^{tmp_path / 'c.tar'}:2: none of its images is readable"):
        open_data(str(tmp_path / "c.tar"), evaluate_only=True, cache_dir=cache)


def test_one_shard_without_a_brace_range_gets_a_hint_with_its_own_name(tmp_path):
    png = (next(iter(digit_images(tmp_path / "img", ["1"], per_class=1).values()))[0]).read_bytes()
    _shard(tmp_path / "val-000003.tar", [("a.png", png), ("a.cls", b"0")])
    with pytest.raises(DataError, match=r"e\.g\. '\S*/val-\{000003\.\.000003\}\.tar'"):
        open_data(str(tmp_path / "val-000003.tar"), evaluate_only=True, cache_dir=str(tmp_path / "cache"))


def two_class_model(names=("1", "2"), img_size=8, patch_size=4, **preprocess):
    """An untrained 1-block ViT with two named classes: enough to evaluate."""
    from vitkit.models.vit import ViT, ViTConfig

    model = ViT(ViTConfig(img_size=img_size, patch_size=patch_size, width=16, depth=1, num_heads=2, mlp_dim=16,
                          num_classes=2))
    model.class_names = list(names)
    model.preprocess.update(preprocess)
    return model


@pytest.mark.parametrize("validated, expected", [
    ("elsewhere", "these are training images"),
    (None, "(without a held-out part): these are training images"),
])
def test_eval_of_the_training_data_of_a_run_warns(tmp_path, monkeypatch, caplog, validated, expected):
    """The run validated on other data, or on none: its own data is its training images."""
    digit_images(tmp_path / "tr", ["1", "2"], per_class=4)
    if validated:
        digit_images(tmp_path / "va", ["1", "2"], per_class=2, offset=4)
    split = open_data(str(tmp_path / "tr"), val=str(tmp_path / "va") if validated else None).split
    assert split.get("val") == (str(tmp_path / "va") if validated else None)
    monkeypatch.setattr("vitkit.weights.vitkit_format.read_metadata", lambda path: {"data": split})
    result = E.evaluate_model(two_class_model(), str(tmp_path / "tr"),
                              weights=str(tmp_path / "run" / "best.safetensors"), workers=0)
    assert result.n == 8 and expected in caplog.text


def test_eval_needs_only_the_classes_it_has_images_of(tmp_path):
    """train/ has a class the checkpoint lacks, val/ has no images of it: the evaluation was refused."""
    digit_images(tmp_path / "d" / "train", ["1", "2", "3"], per_class=2)
    digit_images(tmp_path / "d" / "val", ["1", "2"], per_class=3, offset=2)
    model = two_class_model(["2", "1"])  # and in another order than the folders'
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.0, 5.0]))  # always "1"
    result = E.evaluate_model(model, str(tmp_path / "d"), workers=0)
    assert result.n == 6 and result.top1 == pytest.approx(0.5)
    (tmp_path / "d" / "val" / "3").mkdir()
    digit_images(tmp_path / "d" / "val", ["3"], per_class=1)
    with pytest.raises(DataError, match=r"classes \['3'\] are not among the 2 classes"):
        E.evaluate_model(model, str(tmp_path / "d"), workers=0)


def test_an_image_too_elongated_to_resize_is_skipped_in_evaluation(tmp_path):
    """A 60000x1 PNG is a few hundred bytes; resized to a 224 px model's short side it would be 13 million pixels
    wide (about 16 GB as the transform's float tensor): skipped and listed, as predict does."""
    from PIL import Image

    digit_images(tmp_path / "d", ["1", "2"], per_class=3)
    for c in ("1", "2"):  # images of several sizes: read one by one, not preloaded
        Image.new("RGB", (12, 9), "white").save(tmp_path / "d" / c / "wide.png")
    Image.new("RGB", (60000, 1), "white").save(tmp_path / "d" / "1" / "thin.png")
    model = two_class_model(img_size=224, patch_size=32, crop_pct=0.875)
    result = E.evaluate_model(model, str(tmp_path / "d"), workers=0)
    assert result.n == 8 and len(result.skipped) == 1
    assert result.skipped[0].startswith(f"{tmp_path / 'd' / '1' / 'thin.png'}: 60000x1 is too elongated")


def test_shard_class_names_that_are_not_utf8_are_one_line(tmp_path):
    png = (next(iter(digit_images(tmp_path / "img", ["1"], per_class=1).values()))[0]).read_bytes()
    _shard(tmp_path / "s-000.tar", [("a.png", png), ("a.cls", b"0"), ("b.png", png), ("b.cls", b"1")])
    (tmp_path / "classes.txt").write_bytes("caf\xe9\nth\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"classes\.txt: not UTF-8 text \(invalid continuation byte at byte 3\)"):
        open_data(str(tmp_path / "s-{000..000}.tar"))


def test_shard_sample_names_with_dots_are_one_line(tmp_path):
    """WebDataset keys end at the first dot: img.000.png and img.001.png ran together into one sample, which was
    then skipped as "no image in sample" while the count said 2."""
    png = (next(iter(digit_images(tmp_path / "img", ["1"], per_class=1).values()))[0]).read_bytes()
    _shard(tmp_path / "s-000.tar", [("img.000.png", png), ("img.000.cls", b"0"),
                                    ("img.001.png", png), ("img.001.cls", b"1")])
    with pytest.raises(DataError, match=r"s-000\.tar:img\.000\.cls: a sample name with a dot in it; WebDataset takes "
                                        r"'img' as its key, so such samples run together \(name them like "
                                        r"img_000\.cls\)"):
        open_data(str(tmp_path / "s-{000..000}.tar"))


def test_eval_transform_pickles_for_spawned_loader_workers():
    import pickle

    from vitkit.data.images import eval_transform

    pre = {"mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.875}
    again = pickle.loads(pickle.dumps(eval_transform(pre, (32, 32))))
    from PIL import Image

    assert again(Image.new("RGB", (40, 30), "red")).shape == (3, 32, 32)


def test_shards_evaluation_skips_an_elongated_sample_and_needs_only_the_classes_they_hold(tmp_path):
    from PIL import Image

    def png(img):
        buf = io.BytesIO()
        img.save(buf, "PNG")
        return buf.getvalue()

    good = png(Image.new("RGB", (40, 40), "red"))
    _shard(tmp_path / "v-000.tar", [("a.png", good), ("a.cls", b"0"), ("b.png", good), ("b.cls", b"1"),
                                    ("c.png", png(Image.new("RGB", (400000, 1)))), ("c.cls", b"0")])
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")  # c: no sample of it
    model = two_class_model(["b", "a"], img_size=32, patch_size=16, crop_pct=0.875)
    result = E.evaluate_model(model, str(tmp_path / "v-{000..000}.tar"), workers=0)
    assert result.n == 2 and len(result.skipped) == 1 and "v-000.tar:c: 400000x1 is too elongated" in result.skipped[0]


def _corrupt_middle(path: Path, out: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 400):
        data[i] ^= 0x55
    out.write_bytes(bytes(data))


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_a_damaged_archive_is_refused_not_read_in_part(tmp_path, suffix):
    """tarfile takes a damaged member header for the end of the archive: half the images (and the val/ folder
    after them) were used without a word. A shard alike (it gave some of its samples)."""
    digit_images(tmp_path / "d" / "train", ["1", "2"], per_class=20)
    digit_images(tmp_path / "d" / "val", ["1", "2"], per_class=5, offset=20)
    with tarfile.open(tmp_path / f"good{suffix}", "w:gz" if suffix == ".tar.gz" else "w") as tar:
        tar.add(tmp_path / "d", arcname="d")
    cache = str(tmp_path / "cache")
    assert len(open_data(str(tmp_path / f"good{suffix}"), cache_dir=cache).val) == 10
    _corrupt_middle(tmp_path / f"good{suffix}", tmp_path / f"bad{suffix}")
    with pytest.raises(DataError, match=rf"bad{suffix}: not a readable .tar/.tar.gz archive \((damaged or truncated "
                                        r"after member \d+ .*: a member header that cannot be read|.*CRC check)"):
        open_data(str(tmp_path / f"bad{suffix}"), cache_dir=cache)
    cut = (tmp_path / "good.tar").read_bytes() if suffix == ".tar" else None
    if cut:  # cut off where a member header begins: no end-of-archive marker
        with tarfile.open(tmp_path / "good.tar") as tar:
            last = tar.getmembers()[-1]
        (tmp_path / "cut.tar").write_bytes(cut[:last.offset])
        with pytest.raises(DataError, match=r"cut.tar: .*no end-of-archive marker"):
            open_data(str(tmp_path / "cut.tar"), cache_dir=cache)


def test_a_damaged_shard_is_refused(tmp_path):
    png = (next(iter(digit_images(tmp_path / "img", ["1"], per_class=1).values()))[0]).read_bytes()
    _shard(tmp_path / "s-0.tar", [(f"{i}.{ext}", png if ext == "png" else str(i % 2).encode())
                                  for i in range(40) for ext in ("png", "cls")])
    assert len(open_data(str(tmp_path / "s-{0..0}.tar")).train) == 40
    _corrupt_middle(tmp_path / "s-0.tar", tmp_path / "s-1.tar")
    with pytest.raises(DataError, match=r"s-1.tar: not a readable shard \(damaged or truncated after member"):
        open_data(str(tmp_path / "s-{0..1}.tar"))


def test_a_shard_breaking_off_while_streaming_is_listed_among_the_skipped(tmp_path):
    """With data.epoch_size the shards are not read beforehand: a damaged one is a skipped item naming it, not
    webdataset's raw warnings."""
    png = (next(iter(digit_images(tmp_path / "img", ["1"], per_class=1).values()))[0]).read_bytes()
    _shard(tmp_path / "s-0.tar", [(f"{i}.{ext}", png if ext == "png" else str(i % 2).encode())
                                  for i in range(10) for ext in ("png", "cls")])
    (tmp_path / "s-1.tar").write_bytes(b"\x01" * 5000)
    (tmp_path / "classes.txt").write_text("a\nb\n")
    data = open_data(str(tmp_path / "s-{0..1}.tar"), shards={"epoch_size": 10})
    items = list(data.train.configure(lambda im: 0))
    assert sum(x is not None for x, _ in items) == 10
    assert [m for x, m in items if x is None] == [f"{tmp_path / 's-1.tar'}: not a readable shard (invalid header); "
                                                  "the rest of it is skipped"]


def test_shards_without_a_readable_image_or_with_a_stray_huge_label_stop_before_any_work(tmp_path):
    png = (next(iter(digit_images(tmp_path / "img", ["1"], per_class=1).values()))[0]).read_bytes()
    (tmp_path / "t").mkdir()
    _shard(tmp_path / "t" / "t-0.tar", [(f"{i}.{ext}", png if ext == "png" else str(i % 2).encode())
                                        for i in range(6) for ext in ("png", "cls")])
    (tmp_path / "v").mkdir()
    _shard(tmp_path / "v" / "v-0.tar", [(f"{i}.{ext}", png[:40] if ext == "png" else b"0")
                                        for i in range(3) for ext in ("png", "cls")])
    with pytest.raises(DataError, match=r"v-\{0..0\}.tar: none of its images is readable"):  # was: after an epoch
        open_data(str(tmp_path / "t" / "t-{0..0}.tar"), val=str(tmp_path / "v" / "v-{0..0}.tar"))
    _shard(tmp_path / "v" / "v-1.tar", [])
    with pytest.raises(DataError, match="no sample has a class label"):
        open_data(str(tmp_path / "t" / "t-{0..0}.tar"), val=str(tmp_path / "v" / "v-{1..1}.tar"))
    _shard(tmp_path / "t" / "t-1.tar", [("a.png", png), ("a.cls", b"100000")])  # a typo: 100001 classes
    with pytest.raises(DataError, match=r"labels up to 100000 but only 3 different ones; name the classes in"):
        open_data(str(tmp_path / "t" / "t-{0..1}.tar"))
    _shard(tmp_path / "t" / "t-1.tar", [("a.png", png), ("a.cls", b"500")])  # 501 classes, 3 ever seen
    with pytest.raises(DataError, match=r"labels up to 500 but only 3 different ones"):
        open_data(str(tmp_path / "t" / "t-{0..1}.tar"))


def test_a_class_whose_images_all_fail_to_decode_stops_before_any_work(tmp_path):
    """Larger images (not preloaded) whose headers read but whose pixels do not: the class was left out of
    training or validation without a word; one image a class is decoded now."""
    import numpy as np
    from PIL import Image

    for split, n in (("train", 4), ("val", 2)):
        for c in ("cat", "dog"):
            (tmp_path / "d" / split / c).mkdir(parents=True)
            for i in range(n):
                buf = io.BytesIO()
                Image.fromarray(np.random.default_rng(i).integers(0, 255, (96, 96, 3), np.uint8)).save(buf, "JPEG")
                data = buf.getvalue()
                (tmp_path / "d" / split / c / f"{i}.jpg").write_bytes(data[:len(data) // 2] if
                                                                      (split, c) == ("val", "cat") else data)
    with pytest.raises(DataError, match=r"val/cat: none of its images is readable"):
        open_data(str(tmp_path / "d"), cache_dir=str(tmp_path / "cache"))


def test_split_folders_and_wrappers_are_told_from_classes_in_eval(tmp_path, caplog):
    cache = str(tmp_path / "cache")
    # val/ and test/ without train/: the splits, val/ scored; training has nothing to train on
    digit_images(tmp_path / "e" / "val", ["1", "2"], per_class=2)
    digit_images(tmp_path / "e" / "test", ["1", "2"], per_class=3, offset=2)
    scored = open_data(str(tmp_path / "e"), evaluate_only=True, cache_dir=cache)
    assert (scored.class_names, len(scored.val), scored.val_name) == (["1", "2"], 4, "the val/ folder")
    with pytest.raises(DataError, match=r"val/ but no train/ folder of class folders to train on"):
        open_data(str(tmp_path / "e"), cache_dir=cache)
    # val/ with a class train/ lacks: evaluated (a checkpoint's classes are matched by name later)
    digit_images(tmp_path / "f" / "train", ["1", "2"], per_class=2)
    digit_images(tmp_path / "f" / "val", ["1", "3"], per_class=2, offset=2)
    scored = open_data(str(tmp_path / "f"), evaluate_only=True, cache_dir=cache)
    assert scored.class_names == ["1", "2", "3"] and sorted(set(scored.val.labels.tolist())) == [0, 2]
    # one class folder holding subfolders and images of its own: one class, not a wrapper of classes
    digit_images(tmp_path / "g" / "cat" / "batch1", ["1"], per_class=2)
    digit_images(tmp_path / "g" / "cat", ["2"], per_class=2)
    (tmp_path / "g" / "cat" / "2").rename(tmp_path / "g" / "cat" / "batch2")
    digit_images(tmp_path / "g" / "cat", ["3"], per_class=1)
    for p in (tmp_path / "g" / "cat" / "3").iterdir():
        p.rename(tmp_path / "g" / "cat" / p.name)
    (tmp_path / "g" / "cat" / "3").rmdir()
    scored = open_data(str(tmp_path / "g"), evaluate_only=True, cache_dir=cache)
    assert (scored.class_names, len(scored.val)) == (["cat"], 5)
    assert "images beside its class folders" not in caplog.text
    (tmp_path / "g" / "cat" / "batch1" / "1").rename(tmp_path / "g" / "dog")
    stray = min((tmp_path / "g" / "dog").iterdir())
    stray.rename(tmp_path / "g" / stray.name)  # an image beside the class folders
    open_data(str(tmp_path / "g"), evaluate_only=True, cache_dir=cache)
    assert f"{tmp_path / 'g'}: images beside its class folders are not used" in caplog.text
    # train/ and val/ holding images directly: splits without class folders, not two classes
    for split in ("train", "val"):
        digit_images(tmp_path / "h", ["1"], per_class=2)
        (tmp_path / "h" / "1").rename(tmp_path / "h" / split)
    with pytest.raises(DataError, match=r"train/, val/ hold images, not class folders: expected train/<class>/"):
        open_data(str(tmp_path / "h"), val_split=0.5, cache_dir=cache)


def test_an_empty_class_folder_is_left_out_of_an_evaluation(tmp_path, caplog):
    digit_images(tmp_path / "d" / "train", ["1", "2"], per_class=2)
    digit_images(tmp_path / "d" / "val", ["1", "2"], per_class=2, offset=2)
    (tmp_path / "d" / "val" / "3").mkdir()
    (tmp_path / "d" / "train" / "3").mkdir()
    scored = open_data(str(tmp_path / "d"), evaluate_only=True, cache_dir=str(tmp_path / "cache"))
    assert len(scored.val) == 4 and "val/3: empty class folder (no image files), left out" in caplog.text
    scored = open_data(str(tmp_path / "d" / "val"), evaluate_only=True, cache_dir=str(tmp_path / "cache"))
    assert len(scored.val) == 4  # a plain folder of classes alike
    with pytest.raises(DataError, match=r"train/3: empty class folder"):  # training: refused as before
        open_data(str(tmp_path / "d"), cache_dir=str(tmp_path / "cache"))


def test_validating_on_training_images_and_a_builtin_name_shadowing_a_folder_are_said(tmp_path, caplog,
                                                                                     monkeypatch):
    digit_images(tmp_path / "d", ["1", "2"], per_class=3)
    open_data(str(tmp_path / "d"), val=str(tmp_path / "d"), cache_dir=str(tmp_path / "cache"))
    assert f"--val-data {tmp_path / 'd'} is the training data" in caplog.text
    caplog.clear()  # the val/ folder of a train/ + val/ folder is not trained on
    digit_images(tmp_path / "tv" / "train", ["1", "2"], per_class=3)
    digit_images(tmp_path / "tv" / "val", ["1", "2"], per_class=2, offset=3)
    open_data(str(tmp_path / "tv"), val=str(tmp_path / "tv" / "val"), cache_dir=str(tmp_path / "cache"))
    assert "--val-data" not in caplog.text
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").rename(tmp_path / "digits")
    assert len(open_data("digits", val_split=0.1).class_names) == 10  # scikit-learn's
    assert "digits: the built-in dataset, not the folder here (name that ./digits)" in caplog.text


def test_a_corrupt_cifar_root_is_not_called_missing(tmp_path, monkeypatch):
    from torchvision import datasets

    (tmp_path / "cifar-10-batches-py").mkdir()
    monkeypatch.setattr(datasets.CIFAR10, "download", lambda self: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(DataError, match=r"cifar-10-batches-py is there but its files fail torchvision's integrity"):
        open_data("cifar10", root=str(tmp_path))


def test_eval_knows_a_runs_data_copied_elsewhere_by_its_files(tmp_path, monkeypatch, caplog):
    """A copy of the training folder (or a renamed archive): its held-out part is scored, as at the original
    path; it used to score every image, training ones included, without a word."""
    import shutil

    digit_images(tmp_path / "tr", ["1", "2"], per_class=10)
    split = open_data(str(tmp_path / "tr"), val_split=0.2, cache_dir=str(tmp_path / "cache")).split
    monkeypatch.setattr("vitkit.weights.vitkit_format.read_metadata", lambda path: {"data": split})
    shutil.copytree(tmp_path / "tr", tmp_path / "copy")
    weights = str(tmp_path / "run" / "best.safetensors")
    at_home = E.evaluate_model(two_class_model(), str(tmp_path / "tr"), weights=weights, workers=0)
    copied = E.evaluate_model(two_class_model(), str(tmp_path / "copy"), weights=weights, workers=0)
    assert (copied.n, copied.split, copied.top1) == (at_home.n, at_home.split, at_home.top1) and copied.n == 4
    assert "holds the files" in caplog.text
    min((tmp_path / "copy" / "1").iterdir()).unlink()  # other data now: all of it, as before
    assert E.evaluate_model(two_class_model(), str(tmp_path / "copy"), weights=weights, workers=0).n == 19


def test_an_archive_member_leaving_the_archive_is_left_out_alone(tmp_path, caplog):
    """A link to an absolute path (or a ../ name) inside an archive: that member is left out with a warning; the
    whole archive was refused."""
    digit_images(tmp_path / "d", ["1", "2"], per_class=4)
    with tarfile.open(tmp_path / "d.tar", "w") as tar:
        tar.add(tmp_path / "d", arcname="d")
        link = tarfile.TarInfo("d/1/passwd.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        up = tarfile.TarInfo("../escaped.png")
        up.size = 3
        tar.addfile(up, io.BytesIO(b"abc"))
    data = open_data(str(tmp_path / "d.tar"), val_split=0.5, cache_dir=str(tmp_path / "cache"))
    assert len(data.train) + len(data.val) == 8 and not (tmp_path / "escaped.png").exists()
    assert "d.tar: 2 members left out, e.g. d/1/passwd.png" in caplog.text
    caplog.clear()  # said again when the extracted copy is used
    open_data(str(tmp_path / "d.tar"), val_split=0.5, cache_dir=str(tmp_path / "cache"))
    assert "d.tar: 2 members left out, e.g. d/1/passwd.png" in caplog.text


def test_small_data_mistakes_get_a_hint(tmp_path, caplog):
    cache = str(tmp_path / "cache")
    (tmp_path / "empty.tar.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.tar.gz: empty file$"):
        open_data(str(tmp_path / "empty.tar.gz"), cache_dir=cache)
    with pytest.raises(DataError, match=r"no such file or directory; shards are named with a brace range"):
        open_data(str(tmp_path / "train-*.tar"), cache_dir=cache)
    digit_images(tmp_path / "d" / "train", ["1", "2"], per_class=2)
    (tmp_path / "d" / "train" / "1").rename(tmp_path / "d" / "train" / "cat")
    (tmp_path / "d" / "train" / "2").rename(tmp_path / "d" / "train" / "dog")
    digit_images(tmp_path / "d" / "val", ["1"], per_class=2)
    (tmp_path / "d" / "val" / "1").rename(tmp_path / "d" / "val" / "Cat")
    with pytest.raises(DataError, match=r"classes \['Cat'\] are not among the training classes \(names are matched "
                                        r"exactly, case included: Cat / cat\)"):
        open_data(str(tmp_path / "d"), cache_dir=cache)
    caplog.set_level(logging.INFO, logger="vitkit")
    open_data(str(tmp_path / "d" / "train"), cache_dir=cache)
    assert "no validation (no val/ folder; --val-split 0.1 holds out a tenth" in caplog.text


def test_a_damaged_gz_stream_is_one_error(tmp_path, monkeypatch):
    """zlib's own error (an invalid code inside the deflate stream) was a traceback."""
    import zlib

    digit_images(tmp_path / "d", ["1", "2"], per_class=2)
    with tarfile.open(tmp_path / "d.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "d", arcname="d")

    def broken(self, *args, **kwargs):
        raise zlib.error("Error -3 while decompressing data: invalid literal/length code")

    monkeypatch.setattr(tarfile.TarFile, "extractall", broken)
    with pytest.raises(DataError, match=r"d.tar.gz: not a readable .tar/.tar.gz archive \(Error -3 while"):
        open_data(str(tmp_path / "d.tar.gz"), cache_dir=str(tmp_path / "cache"))
