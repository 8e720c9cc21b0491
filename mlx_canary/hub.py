"""Fetching a NeMo ``.nemo`` checkpoint from the Hugging Face Hub (e.g. ``nvidia/canary-1b-flash``).

``huggingface_hub`` is imported only when a download is asked for, and every failure it can raise for reasons
outside the program (unknown or gated repo, no ``.nemo`` file, no network) becomes a ``CanaryError``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from .errors import CanaryError

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def looks_like_repo_id(source: str) -> bool:
    """True for ``owner/name`` strings that are not local paths (``nvidia/canary-1b-flash``)."""
    return bool(_REPO_ID.match(source)) and not source.endswith(".nemo") and not Path(source).exists()


def _is_network_error(exc: BaseException) -> bool:
    # huggingface_hub's HTTP errors and requests' errors derive from OSError; httpx's do not.
    if isinstance(exc, OSError):
        return True
    module = type(exc).__module__.split(".")[0]
    return module in ("httpx", "httpx2", "httpcore", "requests", "urllib3", "huggingface_hub")


def _hub_error(exc: BaseException, repo_id: str, revision: Optional[str]) -> CanaryError:
    from huggingface_hub import errors

    where = repo_id + (f"@{revision}" if revision else "")
    if isinstance(exc, errors.GatedRepoError):
        return CanaryError(
            f"Hugging Face repo {where} is gated: accept its terms on huggingface.co and log in "
            "(`hf auth login` or HF_TOKEN)"
        )
    if isinstance(exc, errors.RepositoryNotFoundError):
        return CanaryError(
            f"Hugging Face repo {where} not found (check the spelling; private repos need a token)"
        )
    if isinstance(exc, errors.RevisionNotFoundError):
        return CanaryError(f"Hugging Face repo {repo_id} has no revision {revision!r}")
    offline = tuple(
        getattr(errors, n) for n in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") if hasattr(errors, n)
    )
    if isinstance(exc, offline):
        return CanaryError(
            f"cannot download {where}: offline and no cached copy ({exc}); connect to the internet or "
            "pass a local .nemo file"
        )
    return CanaryError(f"cannot download {where} from Hugging Face: {type(exc).__name__}: {exc}")


def _pick_nemo(files: list[str], repo_id: str) -> str:
    candidates = sorted(f for f in files if f.endswith(".nemo"))
    if not candidates:
        raise CanaryError(f"Hugging Face repo {repo_id} has no .nemo file (is it a NeMo Canary model?)")
    if len(candidates) == 1:
        return candidates[0]
    # Several checkpoints: prefer the one named after the repo, as NVIDIA's repos do.
    named = [f for f in candidates if Path(f).stem == repo_id.split("/")[-1]]
    if len(named) == 1:
        return named[0]
    raise CanaryError(
        f"Hugging Face repo {repo_id} has several .nemo files ({', '.join(candidates)}); "
        "download the one you want and pass its path"
    )


def download_nemo(
    repo_id: str,
    *,
    revision: Optional[str] = None,
    cache_dir: Optional[str] = None,
    token: Optional[str] = None,
) -> Path:
    """Download (or reuse from the HF cache) the single ``.nemo`` file of ``repo_id``; return its path.

    When the Hub cannot be reached, a copy already in the cache is used.
    """
    try:
        import huggingface_hub
    except ImportError:
        raise CanaryError(
            "downloading from Hugging Face needs the huggingface_hub package (pip install huggingface_hub)"
        ) from None

    try:
        files = huggingface_hub.list_repo_files(repo_id, revision=revision, token=token)
    except Exception as exc:
        if not _is_network_error(exc):
            raise
        from huggingface_hub import errors

        if isinstance(exc, (errors.RepositoryNotFoundError, errors.RevisionNotFoundError)):
            raise _hub_error(exc, repo_id, revision) from None
        cached = _cached_nemo(huggingface_hub, repo_id, revision, cache_dir)
        if cached is not None:
            return cached
        raise _hub_error(exc, repo_id, revision) from None

    filename = _pick_nemo(files, repo_id)
    try:
        path = huggingface_hub.hf_hub_download(
            repo_id, filename, revision=revision, cache_dir=cache_dir, token=token
        )
    except Exception as exc:
        if not _is_network_error(exc):
            raise
        raise _hub_error(exc, repo_id, revision) from None
    return Path(path)


def _cached_nemo(huggingface_hub, repo_id: str, revision: Optional[str], cache_dir: Optional[str]) -> Optional[Path]:
    """A ``.nemo`` of ``repo_id`` already in the local HF cache, or None."""
    try:
        snapshot = huggingface_hub.snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=["*.nemo"], local_files_only=True
        )
    except Exception as exc:
        if not _is_network_error(exc):
            raise
        return None
    files = [str(p.relative_to(snapshot)) for p in Path(snapshot).rglob("*.nemo")]
    if not files:
        return None
    return Path(snapshot) / _pick_nemo(files, repo_id)


def cache_root() -> Path:
    """Where converted models are kept: ``$MLX_CANARY_CACHE`` or ``~/.cache/mlx-canary``."""
    import os

    root = os.environ.get("MLX_CANARY_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "mlx-canary"


def _nemo_cache_key(nemo: Path, label: str) -> str:
    """A directory name that changes whenever the checkpoint file does."""
    import hashlib

    stat = nemo.stat()
    digest = hashlib.sha256(f"{nemo.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "--", label).strip("-") or "model"
    return f"{safe}-{digest}"


def converted_cache_dir(source: str, *, revision: Optional[str] = None) -> Path:
    """A converted model directory for a ``.nemo`` path or a Hub repo id, converting once into the cache.

    Repos that already hold an MLX conversion (``config.json`` + ``model.safetensors``) are downloaded as is.
    """
    from .config import CONFIG_FILE
    from .convert import convert

    path = Path(source).expanduser()
    if path.is_file():
        nemo, label = path, path.stem
    else:
        mlx_dir = _download_mlx_repo(source, revision)
        if mlx_dir is not None:
            return mlx_dir
        nemo, label = download_nemo(source, revision=revision), source
    out = cache_root() / "converted" / _nemo_cache_key(nemo, label)
    if not (out / CONFIG_FILE).is_file():
        try:
            convert(str(nemo), out, progress=lambda _line: None)
        except CanaryError:
            if not (out / CONFIG_FILE).is_file():  # another process may have won the race
                raise
    return out


def _download_mlx_repo(repo_id: str, revision: Optional[str]) -> Optional[Path]:
    """Snapshot of a pre-converted MLX repo, or None when the repo holds a .nemo to convert instead."""
    try:
        import huggingface_hub
    except ImportError:
        raise CanaryError(
            "downloading from Hugging Face needs the huggingface_hub package (pip install huggingface_hub)"
        ) from None
    try:
        files = huggingface_hub.list_repo_files(repo_id, revision=revision)
    except Exception as exc:
        if not _is_network_error(exc):
            raise
        return None  # download_nemo gives the precise error (or finds a cached copy)
    if "config.json" not in files or "model.safetensors" not in files:
        return None
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision))
    except Exception as exc:
        if not _is_network_error(exc):
            raise
        raise _hub_error(exc, repo_id, revision) from None
