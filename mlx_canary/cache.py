"""The converted-model cache: a ``.nemo`` file, a SALM checkpoint directory or a Hugging Face repo id -> a model
directory converted once into ``$MLX_CANARY_CACHE`` (default ``~/.cache/mlx-canary``, under ``converted/``) and reused.

It sits above both ``convert`` (which converts) and ``hub`` (which downloads), so neither imports the other back.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Optional

from .config import CONFIG_FILE
from .convert import convert
from .errors import CanaryError
from .hub import download_mlx_repo, download_nemo
from .salm_convert import convert_salm, is_salm_checkpoint


def cache_root() -> Path:
    """Where converted models are kept: ``$MLX_CANARY_CACHE`` or ``~/.cache/mlx-canary``."""
    root = os.environ.get("MLX_CANARY_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "mlx-canary"


def _nemo_cache_key(nemo: Path, label: str) -> str:
    """A directory name that changes whenever the checkpoint file does."""
    stat = nemo.stat()
    digest = hashlib.sha256(f"{nemo.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "--", label).strip("-") or "model"
    return f"{safe}-{digest}"


def converted_cache_dir(source: str, *, revision: Optional[str] = None) -> Path:
    """A converted model directory for a ``.nemo`` path or a Hub repo id, converting once into the cache.

    Repos that already hold an MLX conversion (``config.json`` + ``model.safetensors``) are downloaded as is.
    """
    path = Path(source).expanduser()
    if path.is_dir() and is_salm_checkpoint(path):
        return _converted_salm(path, path.name)
    if path.is_file():
        nemo, label = path, path.stem
    else:
        mlx_dir = download_mlx_repo(source, revision)
        if mlx_dir is not None:
            # A SALM checkpoint (canary-qwen) has the same two files as an MLX conversion: convert it.
            return _converted_salm(mlx_dir, source) if is_salm_checkpoint(mlx_dir) else mlx_dir
        nemo, label = download_nemo(source, revision=revision), source
    out = cache_root() / "converted" / _nemo_cache_key(nemo, label)
    stale = _converted_before_aligner(out)
    if stale or not (out / CONFIG_FILE).is_file():
        # convert() builds the directory under a hidden name and renames it into place when complete, so an
        # interrupted or failed conversion leaves no entry here that a later run would mistake for a model.
        try:
            convert(str(nemo), out, overwrite=stale, progress=lambda _line: None)
        except CanaryError as err:
            if (out / CONFIG_FILE).is_file() and not _converted_before_aligner(out):  # another process won the race
                return out
            if path.is_file():
                raise
            raise CanaryError(
                f"{err} (in {nemo}, downloaded from Hugging Face repo {source}; if that download was "
                "interrupted or the file is damaged, delete it and try again)"
            ) from None
    return out


def _converted_before_aligner(model_dir: Path) -> bool:
    """A cached Canary conversion made before the converter kept canary-1b-v2's timestamps model (its config.json
    has no ``aligner`` key): converted again, so that the cache never hides v2's timestamps."""
    import json

    try:
        data = json.loads((model_dir / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("family", "aed") == "aed" and "aligner" not in data


def _converted_salm(checkpoint: Path, label: str) -> Path:
    """A SALM checkpoint directory converted once into the cache (keyed by its weights file)."""
    from .config import WEIGHTS_FILE

    out = cache_root() / "converted" / _nemo_cache_key(checkpoint / WEIGHTS_FILE, label)
    if not (out / CONFIG_FILE).is_file():
        try:
            convert_salm(checkpoint, out, progress=lambda _line: None)
        except CanaryError:
            if not (out / CONFIG_FILE).is_file():  # else: another process won the race
                raise
    return out
