"""vitkit.data.cached: decode an ImageFolder tar once into a uint8 tensor, cache it, split it, augment batches."""
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vitkit.data.cached import augment_batch, cache_path, decode_folder, holdout_split, load_cached

CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10" / "train.tar.gz"


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")  # lossless, so decoded pixels can be compared exactly
    return buf.getvalue()


@pytest.fixture()
def folder_tar(tmp_path):
    """train/{cat,dog}/*.png (lossless, 8x8), a corrupt train/cat/broken.jpg and one val/cat image."""
    rng = np.random.default_rng(0)
    pictures = {f"train/{c}/{i}.png": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                for c in ("dog", "cat") for i in range(3)}
    path = tmp_path / "toy.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, pixels in pictures.items():
            add(name, png_bytes(pixels))
        add("train/cat/broken.jpg", b"\xff\xd8 not really a jpeg")
        add("val/cat/9.png", png_bytes(np.zeros((8, 8, 3), np.uint8)))
    return path, pictures


def test_decode_orders_by_class_and_path_and_skips_broken_images(folder_tar):
    path, pictures = folder_tar
    data = decode_folder(path, subset="train")
    assert data.classes == ["cat", "dog"]
    assert data.images.dtype == torch.uint8 and data.images.shape == (6, 3, 8, 8)
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    for i, name in enumerate(sorted(pictures, key=lambda n: (n.split("/")[1], n))):
        assert torch.equal(data.images[i], torch.from_numpy(pictures[name]).permute(2, 0, 1))
    assert len(data.skipped) == 1 and data.skipped[0].startswith("train/cat/broken.jpg:")
    everything = decode_folder(path)  # without a subset, train/cat and val/cat are one class
    assert everything.labels.tolist() == [0, 0, 0, 0, 1, 1, 1]


def test_decode_resizes_when_asked_and_refuses_mixed_sizes(tmp_path):
    for i, side in enumerate((8, 12)):
        (tmp_path / "imgs" / "a").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((side, side, 3), 100, np.uint8)).save(tmp_path / "imgs" / "a" / f"{i}.png")
    with pytest.raises(ValueError, match="different sizes"):
        decode_folder(tmp_path / "imgs")
    data = decode_folder(tmp_path / "imgs", size=4)
    assert data.images.shape == (2, 3, 4, 4) and (data.images == 100).all()


def test_load_cached_writes_once_then_reads_the_same_tensor(folder_tar, tmp_path):
    path, _ = folder_tar
    first = load_cached(path, cache_dir=tmp_path / "cache")
    cached = cache_path(path, cache_dir=tmp_path / "cache")
    assert cached.is_file()
    stamp = cached.stat().st_mtime_ns
    again = load_cached(path, cache_dir=tmp_path / "cache")
    assert cached.stat().st_mtime_ns == stamp  # read, not rewritten
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert again.classes == first.classes and again.skipped == first.skipped
    cached.write_bytes(b"garbage")  # a damaged cache is rebuilt, not trusted
    assert torch.equal(load_cached(path, cache_dir=tmp_path / "cache").images, first.images)


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tar"):
        load_cached(tmp_path / "nope.tar", cache_dir=tmp_path)


def test_holdout_split_is_seeded_disjoint_and_complete():
    train, val = holdout_split(100, 10, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert sorted(torch.cat([train, val]).tolist()) == list(range(100))
    assert torch.equal(val, holdout_split(100, 0.1, seed=3)[1])
    assert not torch.equal(val, holdout_split(100, 10, seed=4)[1])
    with pytest.raises(ValueError):
        holdout_split(10, 10)


def test_augment_batch_gives_padded_crops_and_mirrors():
    x = torch.randint(0, 256, (32, 3, 6, 6), dtype=torch.uint8)
    out = augment_batch(x, padding=2, generator=torch.Generator().manual_seed(0))
    padded = F.pad(x, (2,) * 4)
    flipped = 0
    for b in range(len(x)):
        crops = [padded[b, :, dy:dy + 6, dx:dx + 6] for dy in range(5) for dx in range(5)]
        plain, mirrored = (any(torch.equal(c, out[b]) for c in crops),
                           any(torch.equal(c.flip(-1), out[b]) for c in crops))
        assert plain or mirrored
        flipped += mirrored and not plain
    assert 0 < flipped < len(x)  # both orientations occur
    only_flip = augment_batch(x, padding=0, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(o, i) or torch.equal(o, i.flip(-1)) for o, i in zip(only_flip, x))


@pytest.mark.skipif(not CIFAR.is_file(), reason="../shared/data/cifar10/train.tar.gz not present")
def test_cifar10_tar_decodes_to_50000_images(tmp_path):
    data = load_cached(CIFAR)  # the default cache: decoded once per machine (~15 s), then instant
    assert data.images.shape == (50000, 3, 32, 32)
    assert data.labels.bincount().tolist() == [5000] * 10 and not data.skipped
    assert data.classes[:3] == ["airplane", "automobile", "bird"]
