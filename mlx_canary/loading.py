"""``load_model``: a converted model directory (or a ``.nemo`` file / Hugging Face repo id) -> ``CanaryModel``.

The directory's config.json names the model family (``FAMILIES``: the Canary encoder-decoder, or the SALM speech-LLM);
the family says which network, tokenizer and engine to build.

A directory must hold ``config.json``, ``model.safetensors`` and the tokenizer files named in the config. A
``.nemo`` file or a repo id that holds a ``.nemo`` is converted once into the cache directory and reused. The name
``demo`` is the tiny model bundled with the package (``mlx_canary/demo``, see docs/demo-model.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from .config import CONFIG_FILE, WEIGHTS_FILE, config_from_dict
from .errors import CanaryError
from .model import Canary
from .quantize import quantize_network
from .tokenizer import load_tokenizer
from .aed import AEDEngine
from .aligner import Aligner, CTCAligner
from .forced_alignment import SentencePieceVocab
from .cache import converted_cache_dir
from .salm_convert import is_salm_checkpoint
from .salm import ADAPTER_FILE, TOKENIZER_FILE as SALM_TOKENIZER_FILE, SALMEngine, SALMNet, SALMTokenizer
from .transcribe import CanaryModel

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
DEMO_MODEL_NAME = "demo"
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo"


@dataclass(frozen=True)
class Family:
    """How a model family is built from its directory: network class, tokenizer reader, engine class."""

    network: Callable
    tokenizer: Callable  # (model_dir, config) -> tokenizer
    engine: Callable  # (net, tokenizer, config, name=) -> engine.Engine
    extras: Callable = lambda model_dir, net, config: None  # reads what else the directory holds for the network
    parts: Callable = lambda model_dir, config, dtype, quantize, group_size: {}  # more engine arguments it holds


def _salm_adapter(model_dir: Path, net: SALMNet, config) -> None:
    """The LoRA factors kept apart at conversion, for the LLM-only mode (older directories have none)."""
    if (model_dir / ADAPTER_FILE).is_file():
        net.attach_adapter(_read_weights(model_dir / ADAPTER_FILE), config.lora_scale)


def _aed_parts(model_dir: Path, config, dtype: Optional[str], quantize: Optional[int], group_size: int) -> dict:
    """canary-1b-v2's timestamps model, when the directory holds one (``config.aligner``)."""
    return {"aligner": load_aligner(model_dir, config, dtype, quantize, group_size) if config.aligner else None}


FAMILIES = {
    "aed": Family(Canary, lambda d, c: load_tokenizer(d, c.tokenizer), AEDEngine, parts=_aed_parts),
    "salm": Family(SALMNet, lambda d, c: SALMTokenizer(d / SALM_TOKENIZER_FILE, c.eos_id, c.pad_id), SALMEngine,
                   _salm_adapter),
}


def load_model(
    path_or_repo: Union[str, Path],
    dtype: Optional[str] = None,
    *,
    quantize: Optional[int] = None,
    group_size: int = 64,
) -> CanaryModel:
    """Load a model from a converted directory, a ``.nemo`` file, or a Hugging Face repo id.

    ``dtype`` ("float32", "float16", "bfloat16") sets the compute dtype; by default it is chosen for the device
    (``default_compute_dtype``). ``quantize`` (8 or 4) quantizes a float model as it loads.
    """
    model_dir = resolve_model_dir(path_or_repo)
    config = read_config(model_dir)
    family = FAMILIES[config.family]
    net = build_network(model_dir, config, dtype, family.network)
    if quantize is not None:
        if config.quantization:
            raise CanaryError(f"{model_dir} is already quantized ({config.quantization['bits']}-bit)")
        config.quantization = quantize_network(net, quantize, group_size)
        mx.eval(net.parameters())
    family.extras(model_dir, net, config)
    tokenizer = family.tokenizer(model_dir, config)
    parts = family.parts(model_dir, config, dtype, quantize, group_size)
    return CanaryModel(family.engine(net, tokenizer, config, name=str(path_or_repo), **parts))


def load_aligner(model_dir: Path, config, dtype: Optional[str] = None, quantize: Optional[int] = None,
                 group_size: int = 64) -> Aligner:
    """The timestamps model stored beside a Canary (``config.aligner``): network, dtype and quantization as the
    main model's, and its SentencePiece vocabulary."""
    import sentencepiece

    aligner_config = config.aligner
    net = build_network(model_dir, aligner_config, dtype, CTCAligner, weights_file=aligner_config.weights_file)
    if quantize is not None and not aligner_config.quantization:
        aligner_config.quantization = quantize_network(net, quantize, group_size)
        mx.eval(net.parameters())
    path = model_dir / aligner_config.tokenizer_file
    try:
        processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as err:
        raise CanaryError(f"cannot read the timestamps model's tokenizer {path}: {err}") from None
    return Aligner(net, SentencePieceVocab(processor), aligner_config)


def resolve_model_dir(path_or_repo: Union[str, Path]) -> Path:
    path = Path(path_or_repo).expanduser()
    if str(path_or_repo) == DEMO_MODEL_NAME and not path.exists():
        if not (DEMO_MODEL_DIR / CONFIG_FILE).is_file():
            raise CanaryError(f"the bundled demo model is missing from this installation ({DEMO_MODEL_DIR})")
        return DEMO_MODEL_DIR
    if path.is_dir() and is_salm_checkpoint(path):  # canary-qwen as NeMo saves it: convert once
        return converted_cache_dir(str(path))
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise CanaryError(
                f"{path} is not an mlx-canary model directory (no {CONFIG_FILE}); "
                "convert a .nemo checkpoint first with `mlx-canary convert`"
            )
        return path
    if path.suffix == ".nemo":
        if not path.is_file():
            raise CanaryError(f"model file not found: {path}")
        return converted_cache_dir(str(path))
    if path.exists():
        raise CanaryError(f"{path} is neither a model directory nor a .nemo file")
    if str(path_or_repo).count("/") == 1 and not str(path_or_repo).startswith((".", "/", "~")):
        return converted_cache_dir(str(path_or_repo))
    raise CanaryError(
        f"model not found: {path_or_repo} (expected a model directory, a .nemo file, a repo id, or "
        f"'{DEMO_MODEL_NAME}' for the bundled demo model)"
    )


def read_config(model_dir: Path):
    path = model_dir / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise CanaryError(f"cannot read {path}: {err}") from None
    except ValueError:
        raise CanaryError(f"cannot read {path}: not valid JSON; re-run `mlx-canary convert` to rebuild the model") from None
    if not isinstance(data, dict):
        raise CanaryError(f"cannot read {path}: not a model configuration (expected a JSON object)")
    try:
        return config_from_dict(data)
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise CanaryError(f"{path} is not a valid mlx-canary configuration: {err}") from None


def build_network(model_dir: Path, config, dtype: Optional[str] = None, network: Callable = Canary,
                  weights_file: str = WEIGHTS_FILE):
    weights_path = model_dir / weights_file
    if not weights_path.is_file():
        raise CanaryError(f"{model_dir} has no {weights_file}; the model directory is incomplete")
    weights = _read_weights(weights_path)

    net = network(config)
    if config.quantization:
        q = config.quantization
        nn.quantize(net, group_size=q["group_size"], bits=q["bits"], class_predicate=_quantized_predicate(weights))
    expected = dict(tree_flatten(net.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in expected.keys() & weights.keys() if expected[k].shape != weights[k].shape)
    if missing or unexpected or wrong:
        raise CanaryError(
            f"{weights_path} does not match its config: "
            + "; ".join(
                f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                if keys
            )
        )
    net.load_weights(list(weights.items()), strict=True)
    target = DTYPES.get(dtype or default_compute_dtype(config))
    if target is None:
        raise CanaryError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    net.update(tree_map(lambda a: _cast(a, target), net.parameters()))
    # The front end stays float32 whatever the model dtype: features are compared against NeMo at 1e-4.
    net.preprocessor.update(tree_map(lambda a: a.astype(mx.float32), net.preprocessor.parameters()))
    mx.eval(net.parameters())
    net.eval()
    return net


def _read_weights(path: Path) -> dict:
    try:
        return mx.load(str(path))
    except Exception as err:  # mlx raises plain RuntimeError/ValueError on a damaged file
        raise CanaryError(f"cannot read {path} (corrupt or incomplete file?): {err}") from None


def default_compute_dtype(config, device: Optional[mx.Device] = None) -> str:
    """The compute dtype when the caller names none.

    CPU: float32 whatever the stored dtype, since MLX's CPU half-precision matmuls are many times slower than
    float32 ones, and float32 gives NeMo's tokens. GPU (Metal, CUDA): half precision, which halves the weight
    traffic that bounds the decoder; a model converted to float32 runs in bfloat16 (float32's range: no overflow
    in the deep encoder's residual stream), one converted to float16 or bfloat16 in that dtype. Pass
    ``dtype="float32"`` on a GPU for NeMo's exact tokens.
    """
    device = device or mx.default_device()
    if device.type == mx.DeviceType.cpu:
        return "float32"
    return config.dtype if config.dtype in ("float16", "bfloat16") else "bfloat16"


def _cast(a: mx.array, dtype) -> mx.array:
    return a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a


def _quantized_predicate(weights: dict):
    """Quantize exactly the layers the saved weights hold in quantized form (their ``scales`` exist)."""

    def predicate(path: str, module) -> bool:
        return f"{path}.scales" in weights

    return predicate
