"""Tests for mlx_canary.prompts: NeMo parity (the lhotse prompt functions transcribe() uses, and the canary2
formatter's user_partial role) over many slot combinations, plus error handling without NeMo."""

from __future__ import annotations

import itertools
import random

import pytest

from mlx_canary.config import TokenizerConfig
from mlx_canary.errors import CanaryError
from mlx_canary.prompts import EMOTIONS, build_lid_prompt, build_prompt, format_prompt
from mlx_canary.tokenizer import load_tokenizer

try:  # tests/ as a plain directory on sys.path, or as a package
    from test_tokenizer import build_nemo_tokenizers, build_plain_tokenizers, train_sentencepiece
except ImportError:  # pragma: no cover
    from tests.test_tokenizer import build_nemo_tokenizers, build_plain_tokenizers, train_sentencepiece

CONTEXTS = ["", "hello world", "Grüße aus München", " leading space", "¿Qué tal? 13 años.", "tab\tnew\nline"]
LANG_PAIRS = [
    ("en", "en"), ("en", "de"), ("de", "en"), ("es", "fr"), ("fr", "fr"), ("<|de|>", "<|de|>"), ("es", "<|en|>"),
]
FLAG_VALUES = [True, False, "yes", "no", "1", "0", "true", "False"]


@pytest.fixture(scope="module")
def nemo_built(tmp_path_factory):
    pytest.importorskip("nemo")
    return build_nemo_tokenizers(tmp_path_factory.mktemp("nemo_prompt_tok"))


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain_prompt_tok")
    built = build_plain_tokenizers(root)
    # A canary-1b-like special set: no context / itn / timestamp tokens.
    pieces = ["<|nospeech|>", "<pad>", "<|endoftext|>", "<|startoftranscript|>", "<|pnc|>", "<|nopnc|>",
              "<|translate|>", "<|transcribe|>", "<|en|>", "<|de|>"]
    train_sentencepiece(root, "tokenizer.v1spl", pieces, len(pieces) + 2, pieces)
    langs = [dict(e) for e in built["aggregate"].config.langs]
    langs[0] = {"lang": "spl_tokens", "model_file": "tokenizer.v1spl.model", "vocab_size": len(pieces) + 2}
    tokenizers = {name: b.load() for name, b in built.items()}
    tokenizers["v1"] = load_tokenizer(root, TokenizerConfig(type="aggregate", langs=langs))
    return tokenizers


def _nemo_flag(value, name):
    if isinstance(value, bool):
        return "yes" if value else "no"
    return value


def _cut(custom):
    from lhotse import MonoCut, SupervisionSegment

    sup = SupervisionSegment(id="s", recording_id="r", start=0, duration=1.0, text="", language=None)
    return MonoCut(id="c", start=0, duration=1.0, channel=0, supervisions=[sup], custom=custom)


def _nemo_canary2(tokenizer, src, tgt, pnc, timestamps, itn, diarize, emotion, context):
    """The prompt NeMo's transcribe() builds (lhotse `canary2` prompt function)."""
    from nemo.collections.common.prompts.canary2 import Canary2PromptFormatter, canary2

    custom = {
        "source_lang": src, "target_lang": tgt, "pnc": _nemo_flag(pnc, "pnc"),
        "timestamp": _nemo_flag(timestamps, "timestamp"), "itn": _nemo_flag(itn, "itn"),
        "diarize": _nemo_flag(diarize, "diarize"), "emotion": emotion, "decodercontext": context,
    }
    return _nemo_encode(tokenizer, Canary2PromptFormatter, canary2, custom)


def _nemo_encode(tokenizer, formatter_cls, prompt_fn, custom):
    formatter = formatter_cls(tokenizer)
    if not custom["target_lang"].startswith("<|"):
        return prompt_fn(_cut(custom), formatter)["context_ids"].tolist()
    # The lhotse path also encodes the (empty) answer with the target language as sub-tokenizer name, which
    # fails for an aggregate tokenizer when that is given as a token; the user turn alone is the same encoding.
    slots = dict(custom, prompt_language="spl_tokens")
    if "taskname" in slots:
        slots["task"] = slots.pop("taskname")
    return formatter.encode_dialog([{"role": "user", "slots": slots}])["context_ids"].tolist()


def _nemo_canary(tokenizer, src, tgt, task, pnc, task_key="taskname"):
    from nemo.collections.common.prompts.canary import CanaryPromptFormatter, canary

    custom = {"source_lang": src, "target_lang": tgt, task_key: task, "pnc": _nemo_flag(pnc, "pnc")}
    return _nemo_encode(tokenizer, CanaryPromptFormatter, canary, custom)


def _canary2_cases(seed):
    """A systematic grid over languages and boolean slots plus random combinations of everything."""
    cases = []
    for i, ((src, tgt), pnc, ts, itn, diar) in enumerate(
        itertools.product(LANG_PAIRS, (True, False), (True, False), (True, False), (True, False))
    ):
        cases.append((src, tgt, pnc, ts, itn, diar, EMOTIONS[i % len(EMOTIONS)], CONTEXTS[i % len(CONTEXTS)]))
    rng = random.Random(seed)
    for _ in range(150):
        src, tgt = rng.choice(LANG_PAIRS)
        cases.append((src, tgt, rng.choice(FLAG_VALUES + ["pnc", "<|nopnc|>"]), rng.choice(FLAG_VALUES),
                      rng.choice(FLAG_VALUES + ["itn", "<|noitn|>"]), rng.choice(FLAG_VALUES + ["<|diarize|>"]),
                      rng.choice(EMOTIONS), rng.choice(CONTEXTS)))
    return cases


@pytest.mark.parity
@pytest.mark.parametrize("variant", ["aggregate", "spe", "spe_noprefix"])
def test_canary2_prompt_matches_nemo(nemo_built, variant):
    built = nemo_built[variant]
    ours = built.load()
    for src, tgt, pnc, ts, itn, diar, emotion, context in _canary2_cases(seed=len(variant)):
        expected = _nemo_canary2(built.nemo, src, tgt, pnc, ts, itn, diar, emotion, context)
        got = build_prompt(ours, "canary2", source_lang=src, target_lang=tgt, pnc=pnc, timestamps=ts, itn=itn,
                           diarize=diar, emotion=emotion, context=context)
        assert got == expected, (src, tgt, pnc, ts, itn, diar, emotion, context)


@pytest.mark.parity
def test_canary2_prompt_shapes(nemo_built):
    agg = nemo_built["aggregate"].load()
    spe = nemo_built["spe"].load()
    plain = build_prompt(agg, "canary2", source_lang="en", target_lang="en")
    assert len(plain) == 9 and plain[:2] == [agg.special_tokens["<|startofcontext|>"], agg.bos_id]
    # The decoder context comes from the *target* language's sub-tokenizer.
    ctx = build_prompt(agg, "canary2", source_lang="en", target_lang="de", context="hello world")
    assert ctx[1:-8] == agg.encode("hello world", "de")
    # The single SentencePiece prompt gains a leading dummy-prefix piece (reference §7.2); without it, it does not.
    v2 = build_prompt(spe, "canary2", source_lang="en", target_lang="en")
    assert spe.id_to_piece(v2[0]) == "\u2581" and len(v2) == 10
    noprefix = nemo_built["spe_noprefix"].load()
    assert len(build_prompt(noprefix, "canary2", source_lang="en", target_lang="en")) == 9


@pytest.mark.parity
@pytest.mark.parametrize("variant", ["aggregate", "spe", "spe_noprefix"])
def test_canary_v1_prompt_matches_nemo(nemo_built, variant):
    built = nemo_built[variant]
    ours = built.load()
    tasks = [None, "asr", "ast", "transcribe", "translate", "s2t_translation", "<|transcribe|>", "<|translate|>"]
    for (src, tgt), task, pnc, key in itertools.product(
        LANG_PAIRS, tasks, [True, False, "yes", "no", "pnc", "<|nopnc|>"], ["taskname", "task"]
    ):
        nemo_task = task if task is not None else ("asr" if src.strip("<|>") == tgt.strip("<|>") else "ast")
        expected = _nemo_canary(built.nemo, src, tgt, nemo_task, pnc, key)
        got = build_prompt(ours, "canary", source_lang=src, target_lang=tgt, pnc=pnc, task=task)
        assert got == expected, (src, tgt, task, pnc)
        if variant == "aggregate":
            assert len(got) == 5 and got[0] == ours.bos_id


@pytest.mark.parity
@pytest.mark.parametrize("variant", ["aggregate", "spe", "spe_noprefix"])
def test_lid_prompt_matches_nemo_user_partial(nemo_built, variant):
    from nemo.collections.common.prompts.canary2 import Canary2PromptFormatter

    built = nemo_built[variant]
    ours = built.load()
    formatter = Canary2PromptFormatter(built.nemo)

    def nemo_partial(context):
        turn = {"role": "user_partial", "slots": {"decodercontext": context, "prompt_language": "spl_tokens"}}
        return formatter.encode_dialog([turn])["context_ids"].tolist()

    assert build_lid_prompt(ours, "canary2") == nemo_partial("")
    for context in CONTEXTS[1:]:
        if variant == "aggregate":
            # NeMo cannot encode a user_partial context with an aggregate tokenizer (no target language slot).
            with pytest.raises(IndexError):
                nemo_partial(context)
            got = build_lid_prompt(ours, "canary2", context=context, context_lang="de")
            assert got == [ours.special_tokens["<|startofcontext|>"]] + ours.encode(context, "de") + [ours.bos_id]
        else:
            assert build_lid_prompt(ours, "canary2", context=context) == nemo_partial(context)


# ---------------------------------------------------------------------------------------------------------------
# Unit tests (no NeMo)

def test_canary2_ids_by_hand(plain):
    tok = plain["aggregate"]
    s = tok.special_tokens
    got = build_prompt(tok, "canary2", source_lang="de", target_lang="en", pnc=False, timestamps=True, itn=True,
                       diarize=True, emotion="happy", context="Hello")
    assert got == ([s["<|startofcontext|>"]] + tok.encode("Hello", "en") + [
        tok.bos_id, s["<|emo:happy|>"], s["<|de|>"], s["<|en|>"], s["<|nopnc|>"], s["<|itn|>"], s["<|timestamp|>"],
        s["<|diarize|>"]])
    assert format_prompt(tok, "canary2", source_lang="en", target_lang="de") == (
        "<|startofcontext|><|startoftranscript|><|emo:undefined|><|en|><|de|><|pnc|><|noitn|><|notimestamp|>"
        "<|nodiarize|>")


def test_canary_v1_ids_by_hand(plain):
    tok = plain["v1"]
    s = tok.special_tokens
    assert build_prompt(tok, "canary", source_lang="en", target_lang="en") == [
        tok.bos_id, s["<|en|>"], s["<|transcribe|>"], s["<|en|>"], s["<|pnc|>"]]
    assert build_prompt(tok, "canary", source_lang="en", target_lang="de", pnc="no") == [
        tok.bos_id, s["<|en|>"], s["<|translate|>"], s["<|de|>"], s["<|nopnc|>"]]
    assert build_lid_prompt(tok, "canary") == [tok.bos_id]


@pytest.mark.parametrize("name", ["aggregate", "spe"])
def test_unknown_language_lists_choices(plain, name):
    tok = plain[name]
    for kwargs in ({"source_lang": "xx", "target_lang": "en"}, {"source_lang": "en", "target_lang": "<|xx|>"}):
        with pytest.raises(CanaryError, match=r"Unsupported language .*xx.*supports: en, de"):
            build_prompt(tok, "canary2", **kwargs)


def test_timestamps_refused_where_unsupported(plain):
    with pytest.raises(CanaryError, match="does not predict timestamps"):
        build_prompt(plain["aggregate"], "canary", source_lang="en", target_lang="en", timestamps=True)
    with pytest.raises(CanaryError, match="does not predict timestamps"):
        build_prompt(plain["v1"], "canary2", source_lang="en", target_lang="en", timestamps=True)
    # Tokens the tokenizer lacks make the option unavailable rather than silently mis-encoded.
    with pytest.raises(CanaryError, match="no <\\|startofcontext\\|> token"):
        build_prompt(plain["v1"], "canary2", source_lang="en", target_lang="en")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"context": "hi"}, "no context"),
        ({"itn": True}, "no itn"),
        ({"diarize": "yes"}, "no diarize"),
        ({"emotion": "sad"}, "no emotion"),
        ({"task": "summarize"}, "Invalid task"),
    ],
)
def test_canary_v1_rejects_canary2_options(plain, kwargs, message):
    with pytest.raises(CanaryError, match=message):
        build_prompt(plain["v1"], "canary", source_lang="en", target_lang="en", **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pnc": "maybe"}, "Invalid value 'maybe' for 'pnc'"),
        ({"itn": 2}, "for 'itn'"),
        ({"emotion": "<|emo:bored|>"}, "Invalid emotion"),
        ({"context": "a <|en|> b"}, "must not contain"),
        ({"context": 5}, "must be a string"),
        ({"task": "translate"}, "contradicts"),
        ({"task": "asr", "target_lang": "de"}, "contradicts"),
    ],
)
def test_canary2_rejects_bad_values(plain, kwargs, message):
    args = {"source_lang": "en", "target_lang": "en", **kwargs}
    with pytest.raises(CanaryError, match=message):
        build_prompt(plain["aggregate"], "canary2", **args)


def test_flag_and_language_spellings(plain):
    tok = plain["aggregate"]
    reference = build_prompt(tok, "canary2", source_lang="en", target_lang="de", pnc=True, itn=False)
    assert build_prompt(tok, "canary2", source_lang="<|en|>", target_lang=" de ", pnc="Yes", itn="<|noitn|>",
                        emotion="emo:undefined", task="translate") == reference


def test_bad_format_and_lid_errors(plain):
    with pytest.raises(CanaryError, match="Unknown prompt format"):
        build_prompt(plain["aggregate"], "whisper", source_lang="en", target_lang="en")
    with pytest.raises(CanaryError, match="context_lang"):
        build_lid_prompt(plain["aggregate"], "canary2", context="hello")
    with pytest.raises(CanaryError, match="no context"):
        build_lid_prompt(plain["v1"], "canary", context="hello")
    tok = plain["aggregate"]
    assert build_lid_prompt(tok, "canary2") == [tok.special_tokens["<|startofcontext|>"], tok.bos_id]
