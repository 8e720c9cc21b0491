"""Weight quantization of a ``Canary`` network (MLX affine group quantization).

What is quantized: every Linear layer (attention, feed-forward, pointwise convolutions, subsampling output,
projection) and the tied token embedding / output head, when the input width divides the group size. What
stays in float: the preprocessor buffers, convolution kernels, norms, biases and position tables — small, and
where precision matters most.
"""

from __future__ import annotations

import mlx.nn as nn

from .errors import CanaryError

SUPPORTED_BITS = (4, 8)
DEFAULT_GROUP_SIZE = 64


def check_settings(bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise CanaryError(f"quantization bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, not {bits}")
    if group_size not in (32, 64, 128):
        raise CanaryError(f"quantization group size must be 32, 64 or 128, not {group_size}")


def quantizable(group_size: int):
    def predicate(path: str, module) -> bool:
        if not isinstance(module, (nn.Linear, nn.Embedding)) or path.startswith("preprocessor"):
            return False
        return module.weight.shape[-1] % group_size == 0

    return predicate


def quantize_network(net, bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> dict:
    """Quantize ``net`` in place; returns the config record ``{"bits", "group_size"}``."""
    check_settings(bits, group_size)
    nn.quantize(net, group_size=group_size, bits=bits, class_predicate=quantizable(group_size))
    return {"bits": bits, "group_size": group_size}


def quantize_weights(net, weights: dict, bits: int, group_size: int) -> tuple[dict, dict]:
    """``weights`` (a converted model's arrays) loaded into ``net`` (a fresh network of that model) and quantized:
    the quantized arrays and the config record, for writing a quantized model directory."""
    from mlx.utils import tree_flatten

    net.load_weights(list(weights.items()), strict=True)
    record = quantize_network(net, bits, group_size)
    return dict(tree_flatten(net.parameters())), record

