"""Sigmoid, SiLU and softmax for the encoder, with a fast path for MLX's CPU backend.

MLX's CPU backend evaluates ``exp`` (hence ``sigmoid``, ``silu``, ``softmax``) one element at a time through libm,
at 15-30 ns per element on x86-64, while plain arithmetic runs vectorised at under 1 ns. In the FastConformer
encoder SiLU alone then costs a fifth of the time. On the CPU these functions therefore build ``exp`` from
arithmetic (Cody-Waite range reduction, a degree-7 polynomial, the power of two assembled in the exponent bits),
compiled by ``mx.compile``: relative error 1.5e-7 (MLX's own CPU sigmoid: 9e-7), 5-8x faster. GPUs (Metal,
CUDA) and half precision keep MLX's built-ins.

The compiled graph still writes a few intermediate arrays (MLX does not fuse across the bit reinterpretation). On
this project's x86-64 test machine SiLU takes 3.0 ns per element against the built-in's 16 up to 770 k elements
(4.3 when the rounding below was a floor); alone in a loop, larger arrays take 17 ns, because MLX's CPU allocator is
plain malloc and glibc hands large freed blocks back to the system and page-faults them in again on the next call
(with glibc's ``M_MMAP_THRESHOLD`` / ``M_TRIM_THRESHOLD`` raised it stays at 4.5 ns at every size; this package
leaves malloc alone: weights allocated after such a change made decoding 20 % slower). Inside the encoder the
built-in pays those faults as well, and the arithmetic path at every size is the faster one: the 1b-flash encoder
in one process, variants interleaved, one core: 9 clips at batch 4 12.35-12.91 -> 11.21-11.44 s, at batch 8
14.65-15.10 -> 13.74-14.51 s, a 30 s input 18.93-19.22 -> 16.98-17.36 s (it used to stop at 786 k elements;
it now stops at 16 M, for memory).

MLX compiles CPU kernels with the system C++ compiler the first time a process on the machine needs them (a few
seconds once; cached under ``$TMPDIR/mlx``). Without a compiler MLX runs the same arithmetic unfused, still about
3x faster than the built-in ``exp``.
"""

from __future__ import annotations

import mlx.core as mx

_LOG2E = 1.4426950408889634
# ln 2 split in two so that k * LN2_HI is exact for |k| < 2**9 (Cody-Waite)
_LN2_HI = 0.693145751953125
_LN2_LO = 1.428606765330187e-06
# Taylor coefficients of exp on |r| <= ln(2)/2, highest degree first (truncation error < 1e-8 relative)
_EXP_COEFFS = (1 / 5040, 1 / 720, 1 / 120, 1 / 24, 1 / 6, 0.5, 1.0, 1.0)
# 1.5 * 2**23: adding and subtracting it rounds a float of magnitude below 2**22 to the nearest integer. Rounding so
# keeps the kernel vectorised, where floor is a libm call per element (a third of the SiLU's time on x86-64). It
# relies on IEEE arithmetic as written (no -ffast-math reassociation): MLX compiles CPU kernels with plain -O3, and
# the GPUs, whose compilers do use fast math, keep MLX's own exp.
_ROUNDER = 12582912.0


def _exp_arith(x: mx.array) -> mx.array:
    # exp overflows float32 above 88.7 and is subnormal below -87.3: clamp so that 2**k stays a normal number,
    # and give exact zeros below (masked attention scores of -10000 must weigh nothing, as with MLX's exp)
    y = mx.clip(x, -87.0, 88.0)
    k = (y * _LOG2E + _ROUNDER) - _ROUNDER  # nearest integer (any integer near y / ln 2 reduces correctly)
    r = y - k * _LN2_HI - k * _LN2_LO
    p = _EXP_COEFFS[0]
    for c in _EXP_COEFFS[1:]:
        p = p * r + c
    two_k = mx.view(mx.left_shift(k.astype(mx.int32) + 127, 23), mx.float32)
    return mx.where(x >= -87.0, p * two_k, 0.0)


def _sigmoid_arith(x: mx.array) -> mx.array:
    return 1.0 / (1.0 + _exp_arith(-x))


def _silu_arith(x: mx.array) -> mx.array:
    return x / (1.0 + _exp_arith(-x))


def _glu_arith(a: mx.array, gate: mx.array) -> mx.array:
    return a / (1.0 + _exp_arith(-gate))


def _glu_masked_arith(a: mx.array, gate: mx.array, keep: mx.array) -> mx.array:
    return mx.where(keep, _glu_arith(a, gate), 0.0)


def _softmax_arith(x: mx.array) -> mx.array:
    e = _exp_arith(x - mx.max(x, axis=-1, keepdims=True))
    return e / mx.sum(e, axis=-1, keepdims=True)


_sigmoid_cpu = mx.compile(_sigmoid_arith)
_silu_cpu = mx.compile(_silu_arith)
_glu_cpu = mx.compile(_glu_arith)
_glu_masked_cpu = mx.compile(_glu_masked_arith)
# compiled too: its exp chain fuses (the reductions stay apart), 25-35 % faster than unfused on encoder scores
_softmax_cpu = mx.compile(_softmax_arith)


# Largest array (elements) for the arithmetic path. Its speed holds at every size (module docstring); the bound is
# on memory: its intermediates (about three arrays of the input's size) stay under 200 MB, where the attention
# scores of a long unchunked input (8 x T x T) would otherwise add gigabytes.
ARITH_MAX_ELEMENTS = 1 << 24


def arith_path(x: mx.array) -> bool:
    """Whether ``x`` takes the arithmetic path: float32 on the CPU, up to ``ARITH_MAX_ELEMENTS``."""
    return (
        x.dtype == mx.float32
        and x.size <= ARITH_MAX_ELEMENTS
        and mx.default_device().type == mx.DeviceType.cpu
    )


def sigmoid(x: mx.array) -> mx.array:
    return _sigmoid_cpu(x) if arith_path(x) else mx.sigmoid(x)


def silu(x: mx.array) -> mx.array:
    return _silu_cpu(x) if arith_path(x) else x * mx.sigmoid(x)


def silu_arith(x: mx.array) -> mx.array:
    """SiLU on the arithmetic path, uncompiled: for compiled functions that fuse it with what comes before."""
    return _silu_arith(x)


def glu(a: mx.array, gate: mx.array, keep: mx.array | None = None) -> mx.array:
    """``a * sigmoid(gate)``: the gated linear unit of the convolution module; zero where ``keep`` (broadcast)
    is False."""
    if arith_path(a):
        return _glu_cpu(a, gate) if keep is None else _glu_masked_cpu(a, gate, keep)
    out = a * mx.sigmoid(gate)
    return out if keep is None else mx.where(keep, out, 0.0)


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    if not arith_path(x):
        return mx.softmax(x, axis=axis, precise=True)
    if axis in (-1, x.ndim - 1):
        return _softmax_cpu(x)
    return mx.moveaxis(_softmax_cpu(mx.moveaxis(x, axis, -1)), -1, axis)
