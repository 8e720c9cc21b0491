"""Tiny real Canary models for tests, without NeMo: a synthetic ``.nemo`` (built with torch) converted to MLX.

``build_tiny_model(root)`` writes ``root/<name>.nemo`` and converts it into ``root/<name>``: a random-weight
canary2 model (languages en, de) whose tokenizer has the canary2 prompt tokens and ``<|timestamp|>`` /
``<|0|>``..``<|63|>``, so timestamps work. ``prompt_format="canary"`` builds a canary v1 (canary-1b style) model
instead: the v1 task tokens and no timestamp tokens. Building takes a fraction of a second.

``LocalHub`` stands in for the Hugging Face Hub (never the network): repos served from local directories through
monkeypatched ``huggingface_hub`` download functions, with downloads that can be interrupted mid-way or leave a
partial file.

Importing this module skips the importing test module when torch or sentencepiece is missing (through
test_convert's ``importorskip``).
"""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path
from types import SimpleNamespace

import test_convert as tc

MODEL_ID = "tiny-canary"
EXTRA_SPECIALS = ["<|emo:undefined|>", "<|itn|>", "<|noitn|>", "<|timestamp|>", "<|notimestamp|>", "<|diarize|>",
                  "<|nodiarize|>"] + [f"<|{i}|>" for i in range(64)]
V1_SPECIALS = ["<|transcribe|>", "<|translate|>"]


def build_tiny_nemo(root: Path, name: str = MODEL_ID, prompt_format: str = "canary2", extra_files=None) -> Path:
    """Write ``root/<name>.nemo``: a tiny random-weight Canary checkpoint (languages en, de); ``extra_files`` (member
    name -> bytes) are added to the archive (e.g. a timestamps model)."""
    specials = tc.SPECIALS + (EXTRA_SPECIALS if prompt_format == "canary2" else V1_SPECIALS)
    spm_models = {
        "spl_tokens": tc.train_spm(["a"], len(specials) + 4, specials),
        "en": tc.train_spm(tc.EN_TEXT, 40),
        "de": tc.train_spm(tc.DE_TEXT, 40),
    }
    cfg = tc.tiny_yaml("agg")
    cfg["prompt_format"] = prompt_format
    state = tc.tiny_state(tc.vocab_rows("agg", spm_models))
    files = {**tc.tokenizer_files(cfg, spm_models), **(extra_files or {})}
    return tc.write_nemo(Path(root) / f"{name}.nemo", cfg, state, files)


def build_tiny_model(root: Path, name: str = MODEL_ID, prompt_format: str = "canary2", extra_files=None) -> Path:
    """Convert a tiny random-weight Canary ``.nemo`` into ``root/<name>`` (the ``.nemo`` stays beside it)."""
    from mlx_canary.convert import convert

    nemo = build_tiny_nemo(root, name, prompt_format, extra_files)
    out = Path(root) / name
    convert(nemo, out, overwrite=True)
    return out


def hf_error(cls_name: str, message: str = "boom", status: int | None = None):
    from huggingface_hub import errors

    cls = getattr(errors, cls_name)
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    if status is not None:
        exc.response = SimpleNamespace(status_code=status)
    return exc


class LocalHub:
    """Repos served from local directories; downloads copy into ``cache`` like huggingface_hub's cache."""

    def __init__(self, root: Path):
        root = Path(root)
        self.repos: dict[str, Path] = {}
        self.cache = root / "hf-cache"
        self.transfers: list = []  # (repo_id, filename) actually copied: what would cross the network
        self.fail_after_bytes: int | None = None  # interrupt the next download after this many bytes
        self.leave_partial = False  # the next hf_hub_download "succeeds" with a truncated file

    def add(self, repo_id: str, files: dict) -> None:
        """``files``: name -> a Path to copy or bytes."""
        where = self.cache.parent / "repos" / repo_id.replace("/", "--")
        where.mkdir(parents=True)
        for name, content in files.items():
            target = where / name
            if isinstance(content, Path):
                shutil.copyfile(content, target)
            else:
                target.write_bytes(content)
        self.repos[repo_id] = where

    def _repo(self, repo_id: str) -> Path:
        if repo_id not in self.repos:
            raise hf_error("RepositoryNotFoundError", f"404 Client Error: Repository Not Found for {repo_id}")
        return self.repos[repo_id]

    def _fetch(self, repo_id: str, filename: str) -> Path:
        source = self._repo(repo_id) / filename
        target = self.cache / repo_id.replace("/", "--") / filename
        if target.is_file() and not self.leave_partial:
            return target  # already in the cache: no transfer
        target.parent.mkdir(parents=True, exist_ok=True)
        data = source.read_bytes()
        self.transfers.append((repo_id, filename))
        if self.fail_after_bytes is not None:
            cut, self.fail_after_bytes = self.fail_after_bytes, None
            # huggingface_hub streams into <blob>.incomplete and renames it when complete
            (target.parent / (target.name + ".incomplete")).write_bytes(data[:cut])
            raise ConnectionError(f"Connection broken: IncompleteRead({cut} bytes read, {len(data) - cut} more "
                                  "expected)")
        if self.leave_partial:
            self.leave_partial = False
            target.write_bytes(data[: len(data) // 2])
            return target
        target.write_bytes(data)
        return target

    def install(self, monkeypatch) -> "LocalHub":
        """Serve huggingface_hub's download functions from here, with the converted-model cache in ``root``."""
        import huggingface_hub

        for name in ("list_repo_files", "hf_hub_download", "snapshot_download"):
            monkeypatch.setattr(huggingface_hub, name, getattr(self, name))
        monkeypatch.setenv("MLX_CANARY_CACHE", str(self.cache.parent / "mlx-canary-cache"))
        return self

    # -- the huggingface_hub functions mlx_canary.hub calls

    def list_repo_files(self, repo_id, revision=None, token=None, **kw):
        return sorted(p.name for p in self._repo(repo_id).iterdir())

    def hf_hub_download(self, repo_id, filename, revision=None, cache_dir=None, token=None, **kw):
        return str(self._fetch(repo_id, filename))

    def snapshot_download(self, repo_id, revision=None, cache_dir=None, allow_patterns=None, local_files_only=False,
                          **kw):
        names = self.list_repo_files(repo_id)
        if allow_patterns is not None:
            names = [n for n in names if any(fnmatch.fnmatch(n, pattern) for pattern in allow_patterns)]
        if local_files_only:
            cached = [self.cache / repo_id.replace("/", "--") / n for n in names]
            if not any(p.is_file() for p in cached):
                raise hf_error("LocalEntryNotFoundError", "not in the cache")
        else:
            for name in names:
                self._fetch(repo_id, name)
        return str(self.cache / repo_id.replace("/", "--"))
