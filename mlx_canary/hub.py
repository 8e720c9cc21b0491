"""The Hugging Face Hub: ``.nemo`` downloads, pre-converted MLX repo downloads, and publishing converted models.

``download_nemo`` fetches the one ``.nemo`` file of a NeMo repo such as ``nvidia/canary-1b-flash``;
``download_mlx_repo`` a repo that already holds an MLX conversion (``cache.py`` decides which, and converts);
``upload_model`` publishes a converted directory with a generated model card.

``huggingface_hub`` is imported only when the Hub is used, and every failure it can raise for reasons outside
the program (unknown or gated repo, no ``.nemo`` file, no network, an interrupted download, no write access)
becomes a ``CanaryError``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from .errors import CanaryError

# Files of a converted model directory (config.json, model.safetensors, tokenizer_*.model, nemo_config.yaml)
# and its model card: what is downloaded from a pre-converted MLX repo.
MLX_REPO_FILES = ["*.json", "*.safetensors", "*.model", "*.yaml", "README.md"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` when it has the ``ORG/NAME`` form of a Hugging Face repo id, else a ``CanaryError``."""
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id):
        raise CanaryError(f"{repo_id!r} is not a Hugging Face repo id; use ORG/NAME, e.g. my-org/canary-1b-flash-mlx")
    return repo_id


def _huggingface_hub():
    try:
        import huggingface_hub
    except ImportError:
        raise CanaryError(
            "talking to the Hugging Face Hub needs the huggingface_hub package (pip install huggingface_hub)"
        ) from None
    return huggingface_hub


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
    huggingface_hub = _huggingface_hub()

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


def download_mlx_repo(repo_id: str, revision: Optional[str]) -> Optional[Path]:
    """Snapshot of a pre-converted MLX repo, or None when the repo holds a .nemo to convert instead."""
    huggingface_hub = _huggingface_hub()
    try:
        files = huggingface_hub.list_repo_files(repo_id, revision=revision)
    except Exception as exc:
        if not _is_network_error(exc):
            raise
        return None  # download_nemo gives the precise error (or finds a cached copy)
    if "config.json" not in files or "model.safetensors" not in files:
        return None
    try:
        # Only what a model directory holds: a repo may carry other large files (the .nemo it came from).
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=MLX_REPO_FILES))
    except Exception as exc:
        if not _is_network_error(exc):
            raise
        raise _hub_error(exc, repo_id, revision) from None


# -- publishing ----------------------------------------------------------------------------------------------


def base_model_of(source: str) -> Optional[str]:
    """The Hub repo a conversion came from (``config.source`` without ``@revision``), or None for local files."""
    repo = str(source or "").split("@", 1)[0]
    return repo if _REPO_ID.match(repo) and not repo.endswith(".nemo") and not repo.startswith(".") else None


def model_card(config, repo_id: str, base_model: Optional[str] = None) -> str:
    """README.md for a converted model on the Hub: YAML front matter (library, tags, base model, languages)
    and how to use it."""
    import yaml

    from ._version import __version__

    base_model = base_model or base_model_of(config.source)
    languages = [lang for lang in config.languages if re.fullmatch(r"[a-z]{2,3}", lang)]
    meta: dict = {
        "library_name": "mlx",
        "tags": ["mlx", "canary", "speech", "automatic-speech-recognition", "speech-translation", "mlx-canary"],
        "pipeline_tag": "automatic-speech-recognition",
    }
    # The license is the original model's (NVIDIA's Canary models differ); the card points there, not guessing.
    if base_model:
        meta["base_model"] = base_model
    if languages:
        meta["language"] = languages
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip("\n")

    quant = config.quantization
    weights = f"{quant['bits']}-bit quantized (group size {quant['group_size']})" if quant else config.dtype
    origin = f"[`{base_model}`](https://huggingface.co/{base_model})" if base_model else f"`{config.model_name}`"
    first = languages[0] if languages else "en"
    other = next((lang for lang in languages if lang != first), None)
    lines = [
        "---", front, "---", "",
        f"# {repo_id}", "",
        f"This model was converted to MLX format from {origin} with mlx-canary {__version__} "
        f"(weights: {weights}). See the original model card for its training data, evaluation and license.", "",
        f"Languages: {', '.join(languages) or 'see the original model card'}.", "",
        "## Use with mlx-canary", "",
        "```bash",
        "pip install mlx-canary",
        f"mlx-canary transcribe audio.wav --model {repo_id} --source-lang {first}",
    ]
    if other:
        lines.append(f"mlx-canary translate audio.wav --model {repo_id} --source-lang {first} --target-lang {other}")
    lines += [
        "```", "",
        "```python",
        "import mlx_canary",
        "",
        f'model = mlx_canary.load_model("{repo_id}")',
        f'result = model.transcribe("audio.wav", source_lang="{first}")',
        "print(result.text)",
        "```", "",
    ]
    return "\n".join(lines)


def _check_model_dir(model_dir: Path):
    """The directory's configuration (either family), after checking it holds a complete converted model."""
    from .config import CONFIG_FILE, load_config

    if not model_dir.is_dir():
        raise CanaryError(f"model directory not found: {model_dir}")
    if not (model_dir / CONFIG_FILE).is_file():
        raise CanaryError(f"{model_dir} is not an mlx-canary model directory (no {CONFIG_FILE})")
    try:
        config = load_config(model_dir)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise CanaryError(f"cannot read {model_dir / CONFIG_FILE}: {err}") from None
    needed = config.required_files
    missing = [name for name in needed if not name or not (model_dir / name).is_file()]
    if missing:
        raise CanaryError(f"{model_dir} is incomplete (missing {', '.join(missing)}); convert it again")
    return config


def _upload_error(exc: BaseException, repo_id: str) -> CanaryError:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403) or type(exc).__name__ == "LocalTokenNotFoundError":
        return CanaryError(
            f"not allowed to write to Hugging Face repo {repo_id}: log in with a token that has write access "
            "(`hf auth login` or HF_TOKEN)"
        )
    return CanaryError(f"cannot upload to Hugging Face repo {repo_id}: {type(exc).__name__}: {exc}")


def upload_model(
    model_dir,
    repo_id: str,
    *,
    base_model: Optional[str] = None,
    private: bool = False,
    token: Optional[str] = None,
    commit_message: Optional[str] = None,
) -> str:
    """Publish a converted model directory to the Hugging Face Hub as ``repo_id``; returns the repo's URL.

    Writes a model card (``README.md``: library ``mlx``, tags, ``base_model`` = the source repo when known, the
    languages, a usage snippet) into ``model_dir``, creates the repo if needed and uploads the directory.
    Such a repo loads directly with ``load_model(repo_id)`` / ``--model repo_id``.
    """
    model_dir = Path(model_dir).expanduser()
    check_repo_id(repo_id)
    config = _check_model_dir(model_dir)
    huggingface_hub = _huggingface_hub()

    from .writers import atomic_write

    try:
        atomic_write(model_dir / "README.md", model_card(config, repo_id, base_model))
    except OSError as err:
        raise CanaryError(f"cannot write the model card {model_dir / 'README.md'}: {err}") from None

    api = huggingface_hub.HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(model_dir),
            repo_type="model",
            commit_message=commit_message or f"Upload {config.model_name} converted with mlx-canary",
            ignore_patterns=[".*", "**/.*"],  # leftovers of interrupted writes, editor and OS files
        )
    except Exception as exc:
        if not _is_network_error(exc):
            raise
        raise _upload_error(exc, repo_id) from None
    return str(getattr(url, "url", None) or url or f"https://huggingface.co/{repo_id}")
