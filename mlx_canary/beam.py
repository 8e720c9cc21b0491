"""Beam search equal to NeMo's ``BeamSearchSequenceGenerator`` (the AED beam decoder of ``transcribe()``).

NeMo's rules reproduced here:
- the first step takes the top-k tokens of the prompt's last position; the loop then runs at most
  ``budget`` more steps (so beam search may emit one token more than greedy);
- finished hypotheses (last token EOS or pad) continue with pad at an unchanged score, and their k-1 other
  candidates are pushed out by adding ``logp * 10001``;
- candidates are ranked by ``score / lp(parent length)`` with the GNMT penalty ``lp(L) = ((5 + L) / 6) ** alpha``,
  and the kept score is multiplied back by the penalty of the *slot* it lands in (a NeMo quirk, harmless at
  alpha = 0, NeMo's effective default);
- lengths count the non-EOS/pad tokens of the whole prefix (prompt included) plus one;
- the result is the hypothesis with the best ``score / lp(length)``.

One NeMo behaviour is a bug for batches: after the prompt pass NeMo tiles its decoder state
(``repeat(beam, 1, 1)``: item order b0, b1, b0, b1) while hypotheses and encoder states are interleaved
(b0, b0, b1, b1), so with more than one utterance per batch hypotheses attend to another utterance's prompt
states. NeMo's token budget is also the batch's (from its padded encoder length), so a short utterance in a batch
may decode longer than alone. ``nemo_batch_quirk=True`` reproduces both for parity checks; by default each
hypothesis uses its own utterance's states and each utterance stops at its own budget (its rows are frozen: pad
appended, score and order kept), which makes batched beam search equal one-at-a-time beam search.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from .decoding import DecodeOptions, generation_budget, strip_trailing
from .model import Canary
from .transformer import cross_mask, prompt_self_mask

# NeMo pushes finished hypotheses' extra candidates out with (1 - NEG_INF) = 10001 times their log-prob.
FINISHED_CANDIDATE_WEIGHT = 10001.0


def length_penalty(lengths: mx.array, alpha: float) -> mx.array:
    return ((5.0 + lengths) / 6.0) ** alpha


def beam_decode(
    model: Canary,
    encoded: mx.array,
    enc_lengths: mx.array,
    prompts: mx.array,
    options: DecodeOptions,
    nemo_batch_quirk: bool = False,
    budget_lengths: Optional[mx.array] = None,
) -> list[list[int]]:
    """Best hypothesis per batch row (prompt and trailing EOS/pad excluded).

    ``budget_lengths`` (B,): the encoder length that sets each row's token budget, as it would alone (NeMo's
    batch-1 budget); without it every row gets the batch's budget (NeMo's batched behaviour)."""
    batch, prompt_len = prompts.shape
    k = options.beam_size
    eos, pad = options.eos_id, options.pad_id
    alpha = options.length_penalty
    budget = generation_budget(model, prompt_len, encoded.shape[1], options.max_generation_delta)
    dtype = encoded.dtype

    cache = model.decoder.new_cache(encoded, prompt_len + budget)
    xmask = cross_mask(enc_lengths, encoded.shape[1], dtype)
    hidden = model.decode(prompts, cache, prompt_self_mask(prompts, pad, dtype), xmask)
    log_probs = _log_softmax(model.logits(hidden[:, -1]))  # (B, V)
    first = mx.argpartition(-log_probs, k - 1, axis=-1)[:, :k]
    first = _sort_desc(log_probs, first)  # torch.topk returns sorted candidates
    scores = mx.take_along_axis(log_probs, first, axis=-1).reshape(-1, 1)  # (B*k, 1)
    tokens = first.reshape(-1, 1).astype(mx.int32)  # generated tokens so far (B*k, t)

    interleaved = mx.repeat(mx.arange(batch), k)  # b0, b0, b1, b1: hypotheses and encoder states
    self_rows = mx.tile(mx.arange(batch), k) if nemo_batch_quirk else interleaved
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[self_rows], layer.values[self_rows]
        layer.cross_keys, layer.cross_values = layer.cross_keys[interleaved], layer.cross_values[interleaved]
    xmask = xmask[interleaved]

    prompt_counts = ((prompts != eos) & (prompts != pad)).sum(axis=1)[interleaved].astype(mx.float32)[:, None]
    prefix_len = mx.full((batch * k, 1), float(prompt_len + 2))
    finished = mx.zeros((batch * k, 1), dtype=mx.bool_)
    own_budget = None
    if budget_lengths is not None and not nemo_batch_quirk:
        budgets = [generation_budget(model, prompt_len, int(n), options.max_generation_delta)
                   for n in budget_lengths.tolist()]
        budget = max(budgets)
        if min(budgets) < budget:
            own_budget = mx.array(budgets)  # (B,)
    identity = mx.arange(batch * k)

    for step in range(budget):
        step_lp = _log_softmax(model.decode_step(tokens[:, -1], cache, xmask))  # (B*k, V)
        cand = mx.argpartition(-step_lp, k - 1, axis=-1)[:, :k]
        cand = _sort_desc(step_lp, cand)
        cand_scores = mx.take_along_axis(step_lp, cand, axis=-1)  # (B*k, k)

        cand = mx.where(finished, pad, cand)
        weight = mx.where(finished, 0.0, 1.0)
        weight = mx.concatenate(
            [weight, mx.where(finished, FINISHED_CANDIDATE_WEIGHT, 1.0) * mx.ones((1, k - 1))], axis=1
        ) if k > 1 else weight
        total = scores + cand_scores * weight  # (B*k, k)
        previous_scores = scores

        penalty = length_penalty(prefix_len, alpha)  # per parent row
        ranked = (total / penalty).reshape(batch, k * k)
        order = _topk_indices(ranked, k)  # (B, k) indices into k*k
        scores = mx.take_along_axis(ranked, order, axis=-1).reshape(-1, 1) * penalty

        parent = (order // k + mx.arange(batch)[:, None] * k).reshape(-1)
        chosen = mx.take_along_axis(cand.reshape(batch, k * k), order, axis=-1).reshape(-1, 1)
        if own_budget is not None:  # utterances past their own budget keep their hypotheses as they are
            stopped = mx.repeat(step >= own_budget, k)  # (B*k,)
            parent = mx.where(stopped, identity, parent)
            chosen = mx.where(stopped[:, None], pad, chosen)
            scores = mx.where(stopped[:, None], previous_scores, scores)
        tokens = mx.concatenate([tokens[parent], chosen.astype(mx.int32)], axis=1)
        cache.reorder_self(parent)

        live = (tokens != eos) & (tokens != pad)
        prefix_len = 1.0 + prompt_counts + live.sum(axis=1, keepdims=True).astype(mx.float32)
        finished = ~live[:, -1:]
        if finished.all().item():
            break

    final = (scores / length_penalty(prefix_len, alpha)).reshape(batch, k)
    best = mx.argmax(final, axis=1) + mx.arange(batch) * k
    rows = tokens[best].tolist()
    return [strip_trailing(row, eos, pad) for row in rows]


def _log_softmax(x: mx.array) -> mx.array:
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def _sort_desc(values: mx.array, idx: mx.array) -> mx.array:
    """Order candidate indices by descending value (ties: lower index first)."""
    picked = mx.take_along_axis(values, idx, axis=-1)
    order = mx.argsort(-picked, axis=-1)
    return mx.take_along_axis(idx, order, axis=-1)


def _topk_indices(values: mx.array, k: int) -> mx.array:
    idx = mx.argpartition(-values, k - 1, axis=-1)[..., :k]
    return _sort_desc(values, idx)
