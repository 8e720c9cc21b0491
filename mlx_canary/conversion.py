"""``convert``: which converter a source needs. A SALM checkpoint (``config.json`` naming ``pretrained_llm`` beside
``model.safetensors``: canary-qwen-2.5b, as a directory or a Hugging Face repo) goes to ``salm_convert``; anything
else (a ``.nemo`` file, a repo holding one) to the Canary converter ``convert``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from .config import CONFIG_FILE, WEIGHTS_FILE
from .convert import convert as convert_nemo
from .hub import looks_like_repo_id
from .salm_convert import convert_salm, is_salm_checkpoint


def is_salm_source(source, revision: Optional[str] = None, token: Optional[str] = None) -> bool:
    """A local SALM checkpoint directory, or a Hub repo holding one (no ``.nemo``, a ``config.json`` that names
    ``pretrained_llm``). Hub errors answer False: the ``.nemo`` path reports them precisely."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists():
        return path.is_dir() and is_salm_checkpoint(path)
    if not looks_like_repo_id(text):
        return False
    try:
        from huggingface_hub import hf_hub_download, list_repo_files

        files = list_repo_files(text, revision=revision, token=token)
        if any(f.endswith(".nemo") for f in files) or not {CONFIG_FILE, WEIGHTS_FILE} <= set(files):
            return False
        cfg = json.loads(Path(hf_hub_download(text, CONFIG_FILE, revision=revision, token=token)).read_text())
    except Exception:
        return False
    return isinstance(cfg, dict) and "pretrained_llm" in cfg


def convert(source, out_dir, dtype: str = "float32", *, revision: Optional[str] = None,
            token: Optional[str] = None, cache_dir: Optional[str] = None, **options):
    """Convert a Canary ``.nemo`` or a SALM checkpoint (path or Hugging Face repo id) into an MLX model directory.

    Options as ``convert.convert`` (``overwrite``, ``progress``, ``quantize``, ``group_size``).
    """
    if is_salm_source(source, revision, token):
        return convert_salm(source, out_dir, dtype, revision=revision, token=token, **options)
    return convert_nemo(source, out_dir, dtype, revision=revision, token=token, cache_dir=cache_dir, **options)
