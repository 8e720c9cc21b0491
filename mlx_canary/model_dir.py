"""Where ``convert`` writes: recognising a converted model directory, and installing or replacing one safely.

``convert --overwrite`` deletes the directory it replaces, so what it may replace is narrow: a directory that holds
an mlx-canary model, recognised by what ``convert`` writes (a ``config.json`` with ``format_version`` and the model
sections, a ``model.safetensors`` whose header carries MLX's ``format: mlx`` marker, the tokenizer files the config
names, ``nemo_config.yaml``) plus the model card ``upload`` adds and files git or the OS put there. Anything else in
it (a user's notes, the source ``.nemo``, a sub-directory) belongs to someone and stops the conversion with a
message naming it. The conversion's input is never inside the directory replaced, the current directory is never
swapped from under the user's shell, and the replacement is a rename of a complete directory: if anything fails,
the previous model is left as it was. The previous model is removed file by file (only the files recognised
above), never with a recursive delete.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import struct
from pathlib import Path
from typing import Callable, Optional

from .config import CONFIG_FILE, WEIGHTS_FILE
from .salm import ADAPTER_FILE as SALM_ADAPTER_FILE
from .salm import TOKENIZER_FILE as SALM_TOKENIZER_FILE
from .errors import CanaryError

logger = logging.getLogger(__name__)

NEMO_CONFIG_COPY = "nemo_config.yaml"
# Not written by convert but at home in a model directory: the model card (hub.upload_model) and OS/git files.
TOLERATED_FILES = frozenset({"README.md", ".gitattributes", ".DS_Store"})
SAFETENSORS_FORMAT = "mlx"  # mx.save_safetensors(..., metadata={"format": "mlx"})
_MAX_SAFETENSORS_HEADER = 100 * 2**20


def output_path(out_dir) -> Path:
    """The directory a conversion writes, absolute and with symlinks resolved (a link to a directory is written
    through: the link stays, its target is replaced)."""
    return _resolved(Path(os.fspath(out_dir)))


def _resolved(path: Path) -> Path:
    try:
        return path.expanduser().resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop (RuntimeError before Python 3.13)
        raise CanaryError(f"cannot resolve {path}: {e}") from None


def check_outside(path: Path, out: Path, what: str) -> None:
    """Refuse when ``path`` (the input, or the download cache) is ``out`` or inside it: replacing ``out`` would
    delete it."""
    real = _resolved(Path(path))
    if real == out or out in real.parents:
        raise CanaryError(
            f"{what} {path} is inside the output directory {out}; converting there could delete it: "
            "choose another output directory"
        )


def _safetensors_format(path: Path) -> Optional[str]:
    """The ``format`` entry of a safetensors file's metadata (None when it is not a readable safetensors file)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return None
            (size,) = struct.unpack("<Q", head)
            if size > _MAX_SAFETENSORS_HEADER:
                return None
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta.get("format") if isinstance(meta, dict) else None


def model_files(out: Path) -> frozenset:
    """The names a converted model in ``out`` consists of; CanaryError saying why when ``out`` holds none."""
    try:
        config = json.loads((out / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise CanaryError(f"it has no {CONFIG_FILE}") from None
    except (OSError, ValueError) as e:
        raise CanaryError(f"its {CONFIG_FILE} is unreadable ({e})") from None
    salm = isinstance(config, dict) and config.get("family") == "salm"
    sections = ("preprocessor", "encoder", "llm") if salm else ("preprocessor", "encoder", "decoder", "tokenizer")
    if not isinstance(config, dict) or "format_version" not in config or not all(
            isinstance(config.get(s), dict) for s in sections):
        raise CanaryError(f"its {CONFIG_FILE} is not an mlx-canary model config")
    if _safetensors_format(out / WEIGHTS_FILE) != SAFETENSORS_FORMAT:
        raise CanaryError(f"it has no {WEIGHTS_FILE} written by mlx-canary")
    if salm:
        return frozenset({CONFIG_FILE, WEIGHTS_FILE, SALM_TOKENIZER_FILE, SALM_ADAPTER_FILE})
    langs = config["tokenizer"].get("langs")
    tokenizers = {str(e.get("model_file")) for e in langs if isinstance(e, dict)} if isinstance(langs, list) else set()
    aligner = config.get("aligner")  # canary-1b-v2's timestamps model: its weights and tokenizer files
    aligner_files = {str(aligner.get(k)) for k in ("weights_file", "tokenizer_file")} if isinstance(aligner, dict) else set()
    return frozenset({CONFIG_FILE, WEIGHTS_FILE, NEMO_CONFIG_COPY, *tokenizers, *aligner_files})


def replaceable_entries(out: Path) -> list:
    """The entries of ``out`` (a directory holding a converted model and nothing else) that replacing it deletes;
    CanaryError naming why ``out`` must not be replaced."""
    try:
        files = model_files(out)
    except CanaryError as e:
        raise CanaryError(
            f"{out} is not an mlx-canary model directory ({e}); --overwrite only replaces a model that convert "
            "wrote: choose a new or empty output directory"
        ) from None
    entries = sorted(out.iterdir())
    foreign = [p.name + ("/" if p.is_dir() else "") for p in entries
               if p.name not in files | TOLERATED_FILES or p.is_dir()]
    if foreign:
        raise CanaryError(
            f"{out} holds a model but also {_names(foreign)}, which --overwrite would delete: move "
            f"{'it' if len(foreign) == 1 else 'them'} elsewhere or choose another output directory"
        )
    return entries


def _names(names: list, limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an output directory the conversion may not write (before any work is done)."""
    try:
        _check_out_dir(out, overwrite)
    except OSError as e:  # e.g. a directory we may not list
        raise CanaryError(f"cannot use {out} as the output directory: {e}") from None


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CanaryError(f"{out} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        try:
            model_files(out)
        except CanaryError:
            raise CanaryError(f"{out} already exists and is not empty: choose a new or empty output directory") \
                from None
        raise CanaryError(f"{out} already holds a model (use overwrite=True / --overwrite to replace it)")
    replaceable_entries(out)
    cwd = Path.cwd().resolve()
    if cwd == out or out in cwd.parents:
        raise CanaryError(
            f"{out} is the current directory; to replace the model in it, run convert from another directory"
        )


def install(tmp: Path, out: Path, overwrite: bool, report: Callable[[str], None] = logger.info) -> None:
    """Move the finished model directory ``tmp`` to ``out``: into an empty ``out``, or (``overwrite``) in place
    of the model ``out`` holds, by renames that leave the previous model whole if anything fails."""
    if not out.is_dir():
        os.rename(tmp, out)
        return
    if not any(out.iterdir()):
        _move_files_into(tmp, out)
        return
    check_out_dir(out, overwrite)  # again: the directory may have changed during the conversion
    old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    _remove_model(old, report)


def _move_files_into(tmp: Path, out: Path) -> None:
    """Fill an existing empty directory (keeping it: it may be the user's current directory, with permissions they
    set); config.json goes last, so an interrupted move never looks like a complete model."""
    names = sorted((p.name for p in tmp.iterdir()), key=lambda n: n == CONFIG_FILE)
    moved = []
    try:
        for name in names:
            os.rename(tmp / name, out / name)
            moved.append(name)
    except BaseException:
        for name in moved:
            try:
                os.rename(out / name, tmp / name)
            except OSError:
                pass
        raise
    tmp.rmdir()


def _remove_model(old: Path, report: Callable[[str], None]) -> None:
    """Delete the replaced model: only the files a model directory consists of, then the directory itself."""
    try:
        for entry in replaceable_entries(old):
            entry.unlink()
        old.rmdir()
    except (CanaryError, OSError) as e:
        report(f"warning: the previous model was kept at {old} (could not remove it: {e})")
