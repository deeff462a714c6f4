"""Download by name, then load like any local file:

- `hf-hub:ORG/REPO[@REVISION]`: a Hugging Face hub repository (transformers or timm layout), via huggingface_hub
  and its cache;
- `https://...` URLs, e.g. the official https://storage.googleapis.com/vit_models/augreg/....npz files, cached
  under $VITKIT_CACHE/downloads (default ~/.cache/vitkit/downloads) and downloaded once.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path
from urllib.parse import urlparse

from . import CheckpointError

HF_PREFIX = "hf-hub:"
_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def is_remote(spec: str) -> bool:
    return spec.startswith((HF_PREFIX, "https://", "http://"))


def cache_dir() -> Path:
    return Path(os.environ.get("VITKIT_CACHE") or Path.home() / ".cache" / "vitkit")


def fetch(spec: str) -> Path:
    """The local path of a remote checkpoint: a file, or a transformers directory."""
    return from_hf(spec[len(HF_PREFIX):]) if spec.startswith(HF_PREFIX) else from_url(spec)


def from_url(url: str) -> Path:
    from torch.hub import download_url_to_file

    name = Path(urlparse(url).path).name or "checkpoint"
    dest = cache_dir() / "downloads" / hashlib.sha256(url.encode()).hexdigest()[:16] / name
    if not dest.exists():  # download_url_to_file writes a temp file and renames it: no half files here
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            download_url_to_file(url, str(dest), progress=sys.stderr.isatty())
        except (OSError, ValueError) as e:  # URLError and HTTPError are OSErrors
            with contextlib.suppress(OSError):
                dest.parent.rmdir()  # leave no empty cache entry behind
            raise CheckpointError(f"{url}: download failed ({e})") from None
    return dest


def from_hf(repo: str) -> Path:
    """Only the files a checkpoint needs: configs and safetensors, else the pickled weights (read with
    weights_only=True later) or .npz."""
    import huggingface_hub

    repo_id, _, revision = repo.partition("@")
    try:
        folder = Path(huggingface_hub.snapshot_download(repo_id, revision=revision or None,
                                                        allow_patterns=["*.json", "*.safetensors"]))
        if not any(folder.glob("*.safetensors")):
            folder = Path(huggingface_hub.snapshot_download(repo_id, revision=revision or None,
                                                            allow_patterns=["*.json", "*.bin", "*.pth", "*.npz"]))
    except Exception as e:  # hub errors (missing repo, no network, gated) have many types; one line for each
        raise CheckpointError(f"{HF_PREFIX}{repo}: download failed ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return _checkpoint_in(folder, f"{HF_PREFIX}{repo}")


def _checkpoint_in(folder: Path, name: str) -> Path:
    """A transformers repository is read as a directory (its config.json says the architecture); any other
    (timm's) by its weights file."""
    with contextlib.suppress(OSError, ValueError):
        if "model_type" in json.loads((folder / "config.json").read_text()):
            return folder
    for w in _WEIGHTS:
        if (folder / w).exists():
            return folder / w
    files = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pth", ".npz"))
    if len(files) == 1:
        return folder / files[0]
    found = f"several weights files ({', '.join(files)})" if files else "no weights file"
    raise CheckpointError(f"{name}: {found}; download the one you want and pass its path")


def transformers_folder(spec: str | Path) -> Path | None:
    """The save_pretrained folder a weights file was taken from (its config.json has a model_type), if any."""
    try:
        config = json.loads((Path(spec).parent / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return Path(spec).parent if isinstance(config, dict) and "model_type" in config else None

