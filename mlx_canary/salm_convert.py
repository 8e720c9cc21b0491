"""NeMo speechlm2 ``SALM`` checkpoint (canary-qwen-2.5b) -> MLX model directory.

The checkpoint is what ``SALM.save_pretrained`` writes (and the Hugging Face repo holds): ``config.json`` (NeMo's
model config: ``perception`` with the FastConformer's ``preprocessor`` / ``encoder`` blocks, ``pretrained_llm``,
``lora``, ``prompt_format``, ``audio_locator_tag``) and ``model.safetensors``. It carries no tokenizer and no LLM
config: both come from the LLM named in ``pretrained_llm`` (a local directory or a Hugging Face repo id), or from
the checkpoint directory / its ``llm_backbone/`` when they are there (NeMo looks there first too).

Weights: the FastConformer and its front end go through the Canary converter's rules (``convert.map_weights``);
``perception.proj`` -> ``proj``; the LLM's tensors lose PEFT's wrapping (``llm.base_model.model.``) and the LoRA
adapters are merged into their base layer, W + (lora_alpha / r) * B @ A, as PEFT computes them at inference;
``embed_tokens`` (held outside the LLM by NeMo) goes back to ``llm.model.embed_tokens``. The result is checked
against the parameter tree of ``salm.SALMNet(config)``: same names and shapes, nothing left over. The LoRA factors
are also kept apart (``adapter.safetensors``, float32): NeMo's LLM-only mode runs the LLM with the adapter disabled.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from .config import CONFIG_FILE, WEIGHTS_FILE, SALMConfig
from .convert import (
    DTYPES,
    ConversionSummary,
    _save_safetensors,
    check_weights,
    encoder_config,
    map_weights,
    to_stored_dtype,
    preprocessor_config,
)
from .errors import CanaryError
from .model_dir import check_out_dir, check_outside, install, output_path
from .quantize import check_settings as check_quantization
from .quantize import quantize_weights
from .salm import ADAPTER_FILE, TOKENIZER_FILE, SALMNet

logger = logging.getLogger(__name__)
ProgressFn = Callable[[str], None]

LLM_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
LLM_BACKBONE_DIR = "llm_backbone"  # where newer NeMo checkpoints keep the LLM's config
PEFT_PREFIX = "llm.base_model.model."
PROMPT_FORMATS = ("qwen",)


def is_salm_checkpoint(path: Path) -> bool:
    """A directory with ``config.json`` naming a ``pretrained_llm`` and ``model.safetensors``."""
    try:
        cfg = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "pretrained_llm" in cfg and (path / WEIGHTS_FILE).is_file()


# ---------------------------------------------------------------------------------------------------------------
# Sources


def download_checkpoint(repo_id: str, revision: Optional[str] = None, token: Optional[str] = None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token,
                                      allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, *LLM_FILES[1:],
                                                      f"{LLM_BACKBONE_DIR}/{CONFIG_FILE}"]))
    except Exception as err:  # network, auth, missing repo: one message
        raise CanaryError(f"cannot download {repo_id} from Hugging Face: {err}") from None


def llm_files(checkpoint: Path, pretrained_llm: str, token: Optional[str] = None) -> dict[str, Path]:
    """Paths of the LLM's config.json, tokenizer.json and tokenizer_config.json (beside the checkpoint first)."""
    found: dict[str, Path] = {}
    if (checkpoint / LLM_BACKBONE_DIR / CONFIG_FILE).is_file():
        found["config.json"] = checkpoint / LLM_BACKBONE_DIR / CONFIG_FILE
    for name in LLM_FILES[1:]:
        if (checkpoint / name).is_file():
            found[name] = checkpoint / name
    missing = [n for n in LLM_FILES if n not in found]
    if not missing:
        return found
    local = Path(pretrained_llm).expanduser()
    if local.is_dir():
        for name in missing:
            if not (local / name).is_file():
                raise CanaryError(f"the LLM directory {local} (pretrained_llm) has no {name}")
            found[name] = local / name
        return found
    from huggingface_hub import hf_hub_download

    for name in missing:
        try:
            found[name] = Path(hf_hub_download(pretrained_llm, name, token=token))
        except Exception as err:
            raise CanaryError(f"cannot fetch {name} of the LLM {pretrained_llm!r} (pretrained_llm): {err}") from None
    return found


def _token_text(value) -> Optional[str]:
    return value.get("content") if isinstance(value, dict) else value


def read_tokenizer(files: dict[str, Path], tag: str):
    """The LLM tokenizer with the audio placeholder added as a special token (as NeMo's SALM adds it), its ids."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(files["tokenizer.json"]))
    tok.add_special_tokens([AddedToken(tag, special=True, normalized=False)])
    settings = json.loads(files["tokenizer_config.json"].read_text())
    eos = _token_text(settings.get("eos_token"))
    if eos is None or tok.token_to_id(eos) is None:
        raise CanaryError(f"the LLM tokenizer names no end-of-sequence token ({files['tokenizer_config.json']})")
    # NeMo's text_pad_id: the pad token, else unk, else 0.
    pad = next((tok.token_to_id(t) for t in (_token_text(settings.get("pad_token")),
                                               _token_text(settings.get("unk_token"))) if t is not None), None)
    return tok, tok.token_to_id(tag), tok.token_to_id(eos), 0 if pad is None else pad


# ---------------------------------------------------------------------------------------------------------------
# Config and weights


def build_config(cfg: dict, llm: dict, tag_id: int, eos_id: int, pad_id: int) -> SALMConfig:
    perception = cfg.get("perception")
    if not isinstance(perception, dict) or "encoder" not in perception or "preprocessor" not in perception:
        raise CanaryError("config.json: perception.encoder / perception.preprocessor are missing (not a SALM "
                          "checkpoint written by save_pretrained?)")
    adapter = perception.get("modality_adapter") or {}
    if str(adapter.get("_target_", "")).rsplit(".", 1)[-1] != "IdentityConnector":
        raise CanaryError(f"unsupported model: perception.modality_adapter = {adapter.get('_target_')!r} "
                          "(only IdentityConnector + linear projection, as canary-qwen-2.5b)")
    if cfg.get("prompt_format") not in PROMPT_FORMATS:
        raise CanaryError(f"unsupported model: prompt_format = {cfg.get('prompt_format')!r} "
                          f"(supported: {', '.join(PROMPT_FORMATS)})")
    return SALMConfig(
        preprocessor=preprocessor_config(perception),
        encoder=encoder_config(perception),
        llm=llm,
        prompt_format=cfg["prompt_format"],
        audio_locator_tag=cfg.get("audio_locator_tag", "<|audioplaceholder|>"),
        audio_locator_id=tag_id,
        eos_id=eos_id,
        pad_id=pad_id,
    )


def lora_scale(cfg: dict) -> float:
    lora = cfg.get("lora") or {}
    if lora.get("use_rslora") or lora.get("use_dora"):
        raise CanaryError("unsupported model: lora.use_rslora / use_dora (only plain LoRA)")
    return float(lora.get("lora_alpha", 8)) / float(lora.get("r", 8))


def map_llm_weights(state: dict, scale: float, adapter: Optional[dict] = None) -> dict:
    """LLM tensors (MLX arrays) -> ``llm.*`` names with LoRA merged; consumes ``state``'s LLM entries.

    ``adapter`` (a dict) receives the LoRA factors, ``<layer>.lora_a`` (r, in) and ``<layer>.lora_b`` (out, r), which
    the LLM-only mode (NeMo's ``disable_adapter``) subtracts again at run time."""
    import mlx.core as mx

    out = {"llm.model.embed_tokens.weight": state.pop("embed_tokens.weight")}
    lora = re.compile(r"(.+)\.(base_layer\.weight|lora_A\.default\.weight|lora_B\.default\.weight)")
    bases: dict[str, dict] = {}
    for key in [k for k in state if k.startswith("llm.")]:
        value = state.pop(key)
        name = "llm." + key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        match = lora.fullmatch(name)
        if match:
            bases.setdefault(match.group(1), {})[match.group(2).split(".")[0]] = value
        else:
            out[name] = value
    for layer, parts in bases.items():
        if set(parts) != {"base_layer", "lora_A", "lora_B"}:
            raise CanaryError(f"LoRA layer {layer} is incomplete in the checkpoint ({', '.join(sorted(parts))})")
        base = parts["base_layer"]
        delta = parts["lora_B"].astype(mx.float32) @ parts["lora_A"].astype(mx.float32)
        merged = (base.astype(mx.float32) + scale * delta).astype(base.dtype)
        mx.eval(merged)
        out[f"{layer}.weight"] = merged
        if adapter is not None:
            adapter[f"{layer}.lora_a"] = parts["lora_A"].astype(mx.float32)
            adapter[f"{layer}.lora_b"] = parts["lora_B"].astype(mx.float32)
    return out


def map_all_weights(state: dict, config: SALMConfig, cfg: dict, adapter: Optional[dict] = None) -> dict:
    """Every checkpoint tensor -> MLX names/layouts (MLX arrays), strictly checked against ``SALMNet``; the LoRA
    factors go to ``adapter``."""
    import mlx.core as mx

    perception = {k[len("perception."):]: np.array(state.pop(k).astype(mx.float32))
                  for k in [k for k in state if k.startswith(("perception.preprocessor.", "perception.encoder."))]}
    mapped = {k: mx.array(v) for k, v in
              map_weights(perception, shared_pos_bias=not config.encoder.untie_biases).items()}
    for part in ("weight", "bias"):
        if f"perception.proj.{part}" in state:
            mapped[f"proj.{part}"] = state.pop(f"perception.proj.{part}")
    mapped.update(map_llm_weights(state, lora_scale(cfg) if cfg.get("lora") else 0.0, adapter))
    if config.llm.get("tie_word_embeddings"):
        mapped.pop("llm.lm_head.weight", None)
    if state:
        raise CanaryError(f"the checkpoint has tensors this converter does not know: {', '.join(sorted(state)[:12])}")
    check_weights(mapped, expected_shapes(config))
    return mapped


def expected_shapes(config: SALMConfig) -> dict:
    from mlx.utils import tree_flatten

    from .salm import SALMNet

    return {name: tuple(value.shape) for name, value in tree_flatten(SALMNet(config).parameters())}


# ---------------------------------------------------------------------------------------------------------------
# Driver


def convert_salm(
    source: Union[str, os.PathLike],
    out_dir: Union[str, os.PathLike],
    dtype: str = "float32",
    *,
    overwrite: bool = False,
    progress: Optional[ProgressFn] = None,
    revision: Optional[str] = None,
    token: Optional[str] = None,
    quantize: Optional[int] = None,
    group_size: int = 64,
) -> ConversionSummary:
    """Convert a SALM checkpoint directory (or Hugging Face repo id) into an MLX model directory."""
    import mlx.core as mx

    report = progress or logger.info
    if dtype not in DTYPES:
        raise CanaryError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if quantize is not None:
        check_quantization(quantize, group_size)
    out = output_path(out_dir)
    local = Path(os.fspath(source)).expanduser()
    if local.exists():
        check_outside(local, out, "the source")
    check_out_dir(out, overwrite)
    if local.is_dir():
        checkpoint, source_text, name = local, str(local.resolve()), local.resolve().name
    else:
        report(f"downloading {source} from Hugging Face (cached after the first time)")
        checkpoint = download_checkpoint(os.fspath(source), revision, token)
        source_text, name = os.fspath(source), os.fspath(source).split("/")[-1]
    if not is_salm_checkpoint(checkpoint):
        raise CanaryError(f"{source}: not a SALM checkpoint (config.json with pretrained_llm + model.safetensors)")
    cfg = json.loads((checkpoint / CONFIG_FILE).read_text())

    report(f"reading the LLM's config and tokenizer ({cfg['pretrained_llm']})")
    files = llm_files(checkpoint, str(cfg["pretrained_llm"]), token)
    llm = json.loads(files["config.json"].read_text())
    tag = cfg.get("audio_locator_tag", "<|audioplaceholder|>")
    tokenizer, tag_id, eos_id, pad_id = read_tokenizer(files, tag)
    config = build_config(cfg, llm, tag_id, eos_id, pad_id)
    config.model_name, config.source, config.dtype = name, source_text, dtype

    report(f"reading {checkpoint / WEIGHTS_FILE}")
    try:
        state = dict(mx.load(str(checkpoint / WEIGHTS_FILE)))
    except Exception as err:
        raise CanaryError(f"cannot read {checkpoint / WEIGHTS_FILE}: {err}") from None
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    report("mapping weights (LoRA merged into the LLM)")
    adapter: dict = {}
    arrays = to_stored_dtype(map_all_weights(state, config, cfg, adapter), dtype)
    if adapter:
        config.lora_scale = lora_scale(cfg)
    num_parameters = sum(int(v.size) for k, v in arrays.items() if not k.startswith("preprocessor."))
    if quantize is not None:
        report(f"quantizing to {quantize} bits (group size {group_size})")
        arrays, config.quantization = quantize_weights(SALMNet(config), arrays, quantize, group_size)

    tmp = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        report(f"writing {out}")
        config.save(tmp)
        _save_safetensors(tmp / WEIGHTS_FILE, arrays)
        if adapter:
            _save_safetensors(tmp / ADAPTER_FILE, adapter)
        tokenizer.save(str(tmp / TOKENIZER_FILE))
        install(tmp, out, overwrite, report)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CanaryError(f"cannot write the model to {out}: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return ConversionSummary(out_dir=out, model_name=name, variant="salm", source=source_text, nemo_version="",
                             dtype=dtype if quantize is None else f"{dtype}, {quantize}-bit",
                             num_parameters=num_parameters, size_bytes=size, languages=["en"],
                             notes=[f"LLM: {llm.get('model_type')} from {cfg['pretrained_llm']}; LoRA merged"])
