"""Autoregressive decoding over ``Canary``: batched greedy search with NeMo's length and EOS rules.

NeMo's rules kept here: the token budget is ``min(max_sequence_length, T_enc + delta) - prompt_length`` where
T_enc is the *padded* encoder length of the batch (``delta < 0`` means no audio-dependent cap); a sequence that
emitted EOS keeps producing pad; decoding stops when every sequence has emitted EOS or the budget is spent;
only trailing EOS/pad are stripped from the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from .model import Canary
from .transformer import cross_mask, prompt_self_mask


@dataclass
class DecodeOptions:
    eos_id: int
    pad_id: int
    max_generation_delta: int = -1
    beam_size: int = 1
    length_penalty: float = 0.0
    # NeMo's beam search (used even at beam size 1 when the checkpoint says strategy "beam") takes one more
    # step than its greedy search at the length cap; greedy decoding of a beam-1 search gives the same tokens.
    beam_strategy: bool = False


def generation_budget(model: Canary, prompt_length: int, encoded_length: int, delta: int) -> int:
    """Maximum number of new tokens NeMo allows (greedy; its beam search allows one more)."""
    max_seq = model.config.decoder.max_sequence_length
    if delta >= 0:
        max_seq = min(max_seq, encoded_length + delta)
    return max(max_seq - prompt_length, 0)


def strip_trailing(tokens: list[int], eos_id: int, pad_id: int) -> list[int]:
    end = len(tokens)
    while end and tokens[end - 1] in (eos_id, pad_id):
        end -= 1
    return tokens[:end]


def greedy_decode(
    model: Canary,
    encoded: mx.array,
    enc_lengths: mx.array,
    prompts: mx.array,
    options: DecodeOptions,
    max_new_tokens: Optional[int] = None,
    budget_lengths: Optional[mx.array] = None,
) -> list[list[int]]:
    """Generated ids (prompt and trailing EOS/pad excluded) for each row of a batch.

    encoded: (B, T_enc, D); enc_lengths: (B,); prompts: (B, P) int32, right-padded with pad.
    ``max_new_tokens`` lowers NeMo's budget (language ID reads just the first tokens). ``budget_lengths`` (B,):
    the encoder length that sets each row's token budget, as it would alone (NeMo's batch-1 budget: a batch then
    decodes every row exactly as alone); without it every row gets the batch's budget (NeMo's batched behaviour:
    a short input may decode longer next to a long one).
    """
    batch, prompt_len = prompts.shape
    extra = int(options.beam_strategy)
    budget = generation_budget(model, prompt_len, encoded.shape[1], options.max_generation_delta) + extra
    row_budget = None
    if budget_lengths is not None:
        budgets = [generation_budget(model, prompt_len, int(n), options.max_generation_delta) + extra
                   for n in budget_lengths.tolist()]
        budget = max(budgets)
        if min(budgets) < budget:
            row_budget = mx.array(budgets)
    if max_new_tokens is not None:
        budget = min(budget, max_new_tokens)
    if budget == 0:
        return [[] for _ in range(batch)]
    dtype = encoded.dtype
    cache = model.decoder.new_cache(encoded, prompt_len + budget)
    xmask = cross_mask(enc_lengths, encoded.shape[1], dtype)

    hidden = model.decode(prompts, cache, prompt_self_mask(prompts, options.pad_id, dtype), xmask)
    logits = model.logits(hidden[:, -1])
    finished = mx.zeros((batch,), dtype=mx.bool_)
    steps: list[mx.array] = []
    for step in range(budget):
        if row_budget is not None:  # rows past their own budget have ended, as they would alone
            finished = finished | (row_budget <= step)
        next_ids = mx.argmax(logits, axis=-1).astype(mx.int32)
        next_ids = mx.where(finished, options.pad_id, next_ids)
        finished = finished | (next_ids == options.eos_id)
        steps.append(next_ids)
        if step + 1 < budget:
            # Queue the next step before the host looks at `finished`, so the check overlaps the compute.
            logits = model.decode_step(next_ids, cache, xmask)
            mx.async_eval(logits, finished)
        if finished.all().item():
            break
    generated = mx.stack(steps, axis=1).tolist()
    return [strip_trailing(row, options.eos_id, options.pad_id) for row in generated]
