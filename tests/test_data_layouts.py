"""DATA layouts found in the wild: a folder of one class, a class named "train", archives with a README or macOS
debris beside the data, broken shards, and a run's data named by a relative path."""
from __future__ import annotations

import io
import tarfile

import pytest

from vitkit.data.datasets import DataError, open_data
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
