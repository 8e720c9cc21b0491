"""Tests for mlx_canary.tokenizer: NeMo parity (CanaryTokenizer / CanaryBPETokenizer) and error handling.

Tiny tokenizers are trained on the fly: with NeMo's own tools for the parity tests, and with plain
SentencePiece (the runtime dependency) for the unit tests. The builders are shared with test_prompts.py.
"""

from __future__ import annotations

import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest
import sentencepiece

from mlx_canary.config import TokenizerConfig
from mlx_canary.errors import CanaryError
from mlx_canary.tokenizer import AggregateTokenizer, SpeTokenizer, load_tokenizer

# Training text for the per-language models (accents, digits, punctuation).
TRAIN_TEXTS = {
    "en": "Hello world. How are you? The quick brown fox jumps over 13 lazy dogs! It's 2024, isn't it? "
    "Numbers like 3.14 and 1,000 are fine; quotes \"too\" (mostly).",
    "de": "Grüße aus München. Wie geht's? Über die Brücke fährt ein Zug um 7 Uhr. Schöne Straße! "
    "Äpfel, Öl und Übermut kosten 12,50 Euro.",
    "es": "¿Qué tal? El niño comió año tras año en España. ¡Mañana será otro día, señor! "
    "Pingüino, corazón y acción: 99 por ciento.",
    "fr": "Ça va? L'élève a été très âgé. Où est la forêt? Noël à Paris, garçon! "
    "Cœur, naïf et théâtre coûtent 45 euros.",
}
LANGS = tuple(TRAIN_TEXTS)

# Special tokens (beyond NeMo's DEFAULT_TOKENS) of the aggregate spl_tokens model, canary2-style.
SPL_EXTRA = [
    "translate", "transcribe", "en", "de", "es", "fr", "startofcontext",
    "emo:undefined", "emo:neutral", "emo:angry", "emo:happy", "emo:sad",
    "itn", "noitn", "timestamp", "notimestamp", "diarize", "nodiarize", "spkchange", "unklang", "spk0",
] + [str(i) for i in range(24)]
NEMO_DEFAULT_TOKENS = ["<|nospeech|>", "<pad>", "<|endoftext|>", "<|startoftranscript|>", "<|pnc|>", "<|nopnc|>"]
SPL_PIECES = NEMO_DEFAULT_TOKENS + [f"<|{t}|>" for t in SPL_EXTRA]

# canary-1b-v2 style single model: specials are user-defined symbols inside one BPE model. Also holds a regional
# language token, a non-language 2-letter token and a token that is not <|...|>-shaped.
SPE_SYMBOLS = SPL_PIECES + ["<|pt-BR|>", "<|zz|>", "<|ok-KO|>", "<|spltoken0|>"]

SAMPLE_TEXTS = [
    "",
    " ",
    "hello world",
    "Hello world. How are you?",
    "  leading and trailing  ",
    "double  space",
    "tab\tand\nnewline",
    "Grüße aus München, 7 Uhr!",
    "¿Qué tal? El niño comió 13 años.",
    "Ça va? L'élève a été très âgé.",
    "ÀÉÎÕÜ ñ ß œ æ",
    "numbers 0123456789 3.14 1,000",
    "punctuation !?.,;:'\"()[]{}-–—…",
    "unicode 東京 😀 ﬁ ligature",
    "ＦＵＬＬＷＩＤＴＨ ＡＢＣ",
    "it's 2024, isn't it?",
]
# Strings with special-token markup (meaningful for the single SentencePiece, which encodes specials in text).
MARKUP_TEXTS = [
    "<|0|> Hello<|3|><|4|> world.<|9|>",
    "<|startoftranscript|><|en|><|pnc|>",
    "a<|endoftext|>",
    "<|nospeech|>",
    "x <pad> y",
    "<|zz|><|pt-BR|>",
]


def _train_text(root: Path, name: str, lines: list[str]) -> Path:
    path = root / f"{name}.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train_sentencepiece(
    root: Path,
    name: str,
    lines: list[str],
    vocab_size: int,
    user_defined_symbols: Optional[list[str]] = None,
    add_dummy_prefix: bool = True,
) -> Path:
    """A BPE SentencePiece model trained with the settings of NeMo's create_spt_model (no NeMo needed)."""
    text = _train_text(root, name, lines)
    kwargs: dict[str, Any] = dict(
        input=str(text),
        model_prefix=str(root / name),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        hard_vocab_limit=False,
        bos_id=-1,
        eos_id=-1,
        remove_extra_whitespaces=False,
        add_dummy_prefix=add_dummy_prefix,
        minloglevel=2,
    )
    if user_defined_symbols:
        kwargs["user_defined_symbols"] = user_defined_symbols
    sentencepiece.SentencePieceTrainer.Train(**kwargs)
    return root / f"{name}.model"


def _entry(model_dir: Path, lang: str, file_name: str) -> dict:
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_dir / file_name))
    return {"lang": lang, "model_file": file_name, "vocab_size": sp.GetPieceSize()}


@dataclass
class Built:
    model_dir: Path
    config: TokenizerConfig
    nemo: Any = None  # the NeMo tokenizer built from the same files (parity fixtures only)

    def load(self):
        return load_tokenizer(self.model_dir, self.config)


def build_plain_tokenizers(root: Path) -> dict[str, Built]:
    """aggregate (spl_tokens, en, de) and spe tokenizers from plain SentencePiece, laid out like NeMo's."""
    root.mkdir(parents=True, exist_ok=True)
    spl = train_sentencepiece(root, "tokenizer.spl_tokens", SPL_PIECES, len(SPL_PIECES) + 2, SPL_PIECES)
    for lang in ("en", "de"):
        train_sentencepiece(root, f"tokenizer.{lang}", [TRAIN_TEXTS[lang]] * 20, 64)
    corpus = [TRAIN_TEXTS[lang] for lang in LANGS] * 10
    train_sentencepiece(root, "tokenizer.spe", corpus, 200, SPE_SYMBOLS)
    assert spl.exists()
    agg = TokenizerConfig(
        type="aggregate",
        langs=[_entry(root, lang, f"tokenizer.{lang}.model") for lang in ("spl_tokens", "en", "de")],
    )
    spe = TokenizerConfig(type="spe", langs=[_entry(root, "all", "tokenizer.spe.model")])
    return {"aggregate": Built(root, agg), "spe": Built(root, spe)}


def build_nemo_tokenizers(root: Path) -> dict[str, Built]:
    """Tokenizers built with NeMo's tools, paired with NeMo's CanaryTokenizer / CanaryBPETokenizer."""
    from nemo.collections.common.tokenizers.canary_tokenizer import CanaryBPETokenizer, CanaryTokenizer
    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import SentencePieceTokenizer, create_spt_model

    model_dir = root / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    nemo_sub = {}
    for lang, text in TRAIN_TEXTS.items():
        work = root / lang
        work.mkdir()
        data = _train_text(work, "train", [text] * 20)
        create_spt_model(str(data), vocab_size=64, sample_size=-1, do_lower_case=False, tokenizer_type="bpe",
                         output_dir=str(work))
        shutil.copy(work / "tokenizer.model", model_dir / f"tokenizer.{lang}.model")
        nemo_sub[lang] = SentencePieceTokenizer(str(work / "tokenizer.model"))
    # force_rebuild would delete tokenizer files in the *current* directory; the output dir is fresh anyway.
    spl = CanaryTokenizer.build_special_tokenizer(SPL_EXTRA, root / "spl_tokens", force_rebuild=False)
    shutil.copy(root / "spl_tokens" / "tokenizer.model", model_dir / "tokenizer.spl_tokens.model")

    def aggregate(order: list[tuple[str, str]]) -> Built:
        subs = {lang: (spl if file_lang == "spl_tokens" else nemo_sub[file_lang]) for lang, file_lang in order}
        config = TokenizerConfig(
            type="aggregate",
            langs=[_entry(model_dir, lang, f"tokenizer.{file_lang}.model") for lang, file_lang in order],
        )
        return Built(model_dir, config, CanaryTokenizer(subs))

    built = {
        "aggregate": aggregate([("spl_tokens", "spl_tokens")] + [(lang, lang) for lang in LANGS]),
        # spl_tokens need not come first; offsets follow config order.
        "aggregate_reordered": aggregate([("de", "de"), ("spl_tokens", "spl_tokens"), ("en", "en")]),
        # canary2-style regional sub-tokenizer names: bare canary-1 codes map onto them.
        "aggregate_regional": aggregate(
            [("spl_tokens", "spl_tokens"), ("en-US", "en"), ("de-DE", "de"), ("fr", "fr")]
        ),
    }

    corpus = [TRAIN_TEXTS[lang] for lang in LANGS] * 10
    spe_work = root / "spe"
    spe_work.mkdir()
    data = _train_text(spe_work, "train", corpus)
    create_spt_model(str(data), vocab_size=200, sample_size=-1, do_lower_case=False, tokenizer_type="bpe",
                     output_dir=str(spe_work), user_defined_symbols=SPE_SYMBOLS)
    shutil.copy(spe_work / "tokenizer.model", model_dir / "tokenizer.spe.model")
    built["spe"] = Built(
        model_dir,
        TokenizerConfig(type="spe", langs=[_entry(model_dir, "all", "tokenizer.spe.model")]),
        CanaryBPETokenizer(str(spe_work / "tokenizer.model")),
    )
    # A single model without the dummy-prefix "▁" (whether canary-1b-v2 has one is unknown, reference §7.2).
    noprefix = train_sentencepiece(root, "tokenizer.spe_noprefix", corpus, 200, SPE_SYMBOLS, add_dummy_prefix=False)
    shutil.copy(noprefix, model_dir / noprefix.name)
    built["spe_noprefix"] = Built(
        model_dir,
        TokenizerConfig(type="spe", langs=[_entry(model_dir, "all", noprefix.name)]),
        CanaryBPETokenizer(str(noprefix)),
    )
    return built


# ---------------------------------------------------------------------------------------------------------------
# Fixtures

@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> dict[str, Built]:
    return build_plain_tokenizers(tmp_path_factory.mktemp("plain_tok"))


@pytest.fixture(scope="module")
def nemo_built(tmp_path_factory) -> dict[str, Built]:
    pytest.importorskip("nemo")
    return build_nemo_tokenizers(tmp_path_factory.mktemp("nemo_tok"))


AGGREGATES = ("aggregate", "aggregate_reordered", "aggregate_regional")
SPES = ("spe", "spe_noprefix")


def _random_id_lists(vocab_size: int, count: int = 300, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(rng.randrange(0, 25))] for _ in range(count)]


# ---------------------------------------------------------------------------------------------------------------
# Parity: aggregate CanaryTokenizer

@pytest.mark.parity
@pytest.mark.parametrize("variant", AGGREGATES)
def test_aggregate_ids_and_specials_match_nemo(nemo_built, variant):
    built = nemo_built[variant]
    ours, nemo = built.load(), built.nemo
    assert isinstance(ours, AggregateTokenizer)
    assert ours.vocab_size == nemo.vocab_size
    assert ours.offsets == nemo.token_id_offset
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.nospeech_id) == (
        nemo.bos_id, nemo.eos_id, nemo.pad_id, nemo.nospeech_id,
    )
    assert ours.special_tokens == nemo.special_tokens
    assert ours.languages == tuple(lang for lang in nemo.langs if lang != "spl_tokens")
    for token_id in range(ours.vocab_size):
        assert ours.id_to_piece(token_id) == nemo.ids_to_tokens([token_id])[0]
    for lang in nemo.langs:
        for piece in nemo.tokenizers_dict[lang].vocab:
            assert ours.token_to_id(piece, lang) == nemo.token_to_id(piece, lang)


@pytest.mark.parity
@pytest.mark.parametrize("variant", AGGREGATES)
def test_aggregate_encode_matches_nemo(nemo_built, variant):
    from nemo.collections.common.tokenizers.aggregate_tokenizer import AggregateTokenizer as NemoAggregate

    built = nemo_built[variant]
    ours, nemo = built.load(), built.nemo
    for lang in ours.languages:
        for text in SAMPLE_TEXTS:
            expected = nemo.text_to_ids(text, lang)
            assert ours.encode(text, lang) == expected, (lang, text)
            assert ours.decode(expected) == nemo.ids_to_text(expected)
        for text in MARKUP_TEXTS:
            # Our encode is the plain SentencePiece path (no EOS / timestamp training conveniences).
            assert ours.encode(text, lang) == NemoAggregate.text_to_ids(nemo, text, lang), (lang, text)


@pytest.mark.parity
def test_aggregate_canary1_codes_map_like_nemo(nemo_built):
    built = nemo_built["aggregate_regional"]
    ours, nemo = built.load(), built.nemo
    assert ours.resolve_language("en") == "en-US"
    assert ours.resolve_language("<|de|>") == "de-DE"
    for text in SAMPLE_TEXTS:
        for code in ("en", "de", "fr"):
            assert ours.encode(text, code) == nemo.text_to_ids(text, code)
    with pytest.raises(RuntimeError):
        nemo.text_to_ids("hola", "es")
    with pytest.raises(CanaryError, match="en-US, de-DE, fr"):
        ours.encode("hola", "es")


@pytest.mark.parity
@pytest.mark.parametrize("variant", AGGREGATES)
def test_aggregate_decode_matches_nemo(nemo_built, variant):
    built = nemo_built[variant]
    ours, nemo = built.load(), built.nemo
    for ids in _random_id_lists(ours.vocab_size):
        assert ours.decode(ids) == nemo.ids_to_text(ids)
    specials = sorted(ours.special_ids)
    mixed = [specials[0]] + nemo.text_to_ids("Hello world.", ours.languages[0]) + list(ours.timestamp_ids[:3])
    assert ours.decode(mixed) == nemo.ids_to_text(mixed)
    # Leading space kept and specials verbatim, as NeMo.
    ids = [ours.timestamp_ids[0]] + ours.encode("hello", ours.languages[0]) + [ours.eos_id]
    assert ours.decode(ids) == nemo.ids_to_text(ids)
    assert ours.decode(ids).startswith("<|0|> ")


@pytest.mark.parity
def test_decode_skips_head_padding_ids_where_nemo_raises(nemo_built):
    built = nemo_built["aggregate"]
    ours, nemo = built.load(), built.nemo
    ids = ours.encode("Hello world.", "en")
    padded = ids[:2] + [ours.vocab_size, ours.vocab_size + 5] + ids[2:]
    assert ours.decode(padded) == nemo.ids_to_text(ids)
    with pytest.raises(KeyError):
        nemo.ids_to_text(padded)


@pytest.mark.parity
@pytest.mark.parametrize("variant", AGGREGATES + SPES)
def test_timestamp_tokens_match_nemo_pieces(nemo_built, variant):
    ours = nemo_built[variant].load()
    assert ours.supports_timestamps
    expected = {}
    for token_id in range(ours.vocab_size):
        match = re.fullmatch(r"<\|(\d+)\|>", ours.id_to_piece(token_id))
        if match:
            expected[token_id] = int(match.group(1))
    assert len(expected) == 24
    assert ours.timestamp_ids == tuple(sorted(expected))
    for token_id, value in expected.items():
        assert ours.is_timestamp(token_id)
        assert ours.timestamp_value(token_id) == value
    assert not ours.is_timestamp(ours.bos_id)


# ---------------------------------------------------------------------------------------------------------------
# Parity: single SentencePiece CanaryBPETokenizer

@pytest.mark.parity
@pytest.mark.parametrize("variant", SPES)
def test_spe_matches_nemo(nemo_built, variant):
    built = nemo_built[variant]
    ours, nemo = built.load(), built.nemo
    assert isinstance(ours, SpeTokenizer)
    assert ours.vocab_size == nemo.vocab_size
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.nospeech_id) == (
        nemo.bos_id, nemo.eos_id, nemo.pad_id, nemo.nospeech_id,
    )
    for text in SAMPLE_TEXTS + MARKUP_TEXTS:
        expected = nemo.text_to_ids(text)
        assert ours.encode(text) == expected, text
        assert ours.decode(expected) == nemo.ids_to_text(expected), text
    for ids in _random_id_lists(ours.vocab_size, seed=1):
        assert ours.decode(ids) == nemo.ids_to_text(ids)
    for token_id in range(ours.vocab_size):
        piece = ours.id_to_piece(token_id)
        assert piece == nemo.ids_to_tokens([token_id])[0]
        assert ours.token_to_id(piece) == nemo.token_to_id(piece)


@pytest.mark.parity
def test_spe_languages_and_specials(nemo_built):
    ours = nemo_built["spe"].load()
    # Language tokens are <|xx|> / <|xx-YY|> with an ISO 639-1 xx, in id order.
    assert ours.languages == ("en", "de", "es", "fr", "pt-BR")
    assert "<|spltoken0|>" in ours.special_tokens and "<pad>" in ours.special_tokens
    assert ours.language_of(ours.token_to_id("<|pt-BR|>")) == "pt-BR"
    assert ours.language_of(ours.token_to_id("<|zz|>")) is None
    assert ours.language_of(ours.bos_id) is None


# ---------------------------------------------------------------------------------------------------------------
# Unit tests (no NeMo)

def test_plain_aggregate_basics(plain):
    tok = plain["aggregate"].load()
    assert tok.kind == "aggregate"
    assert tok.languages == ("en", "de")
    n_spl = len(SPL_PIECES) + 2
    assert tok.offsets == {"spl_tokens": 0, "en": n_spl, "de": n_spl + 64}
    assert (tok.nospeech_id, tok.pad_id, tok.eos_id, tok.bos_id) == (1, 2, 3, 4)
    ids = tok.encode("Hello world.", "en")
    assert all(n_spl <= i < n_spl + 64 for i in ids)
    assert tok.decode(ids) == " Hello world."
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == "<|startoftranscript|> Hello world.<|endoftext|>"
    assert tok.language_of(tok.language_token_id("de")) == "de"
    assert tok.language_token_id("<|en|>") == tok.special_tokens["<|en|>"]
    assert tok.is_special(tok.pad_id) and not tok.is_special(ids[0])
    assert tok.token_to_id("<|pnc|>") == tok.special_tokens["<|pnc|>"]
    assert tok.token_to_id("<unk>", "de") == tok.offsets["de"]


def test_decode_ignores_out_of_range_ids(plain):
    for built in plain.values():
        tok = built.load()
        ids = tok.encode("Hello world.", "en")
        assert tok.decode(ids + [tok.vocab_size, tok.vocab_size + 7, -1]) == tok.decode(ids)
        assert tok.decode([]) == ""


def test_unknown_language_lists_choices(plain):
    tok = plain["aggregate"].load()
    with pytest.raises(CanaryError, match=r"'xx'.*en, de"):
        tok.encode("hello", "xx")
    with pytest.raises(CanaryError, match="en, de"):
        tok.language_token_id("fr")
    with pytest.raises(CanaryError, match="needs a language"):
        tok.encode("hello")
    spe = plain["spe"].load()
    with pytest.raises(CanaryError, match="en, de, es, fr, pt-BR"):
        spe.resolve_language("ja")


def test_missing_tokens_and_ids(plain):
    for built in plain.values():
        tok = built.load()
        with pytest.raises(CanaryError, match="not in"):
            tok.token_to_id("<|definitely-missing|>")
        with pytest.raises(CanaryError, match="not a timestamp"):
            tok.timestamp_value(tok.bos_id)
        with pytest.raises(CanaryError, match="outside the vocabulary"):
            tok.id_to_piece(tok.vocab_size)


def test_load_errors(plain, tmp_path):
    built = plain["aggregate"]
    entries = built.config.langs

    def load(type_="aggregate", langs=None, model_dir=None):
        return load_tokenizer(model_dir or built.model_dir, TokenizerConfig(type=type_, langs=langs or entries))

    with pytest.raises(CanaryError, match="not found"):
        load(model_dir=tmp_path)
    with pytest.raises(CanaryError, match="config says"):
        load(langs=[dict(entries[0], vocab_size=entries[0]["vocab_size"] + 1)] + entries[1:])
    with pytest.raises(CanaryError, match="spl_tokens"):
        load(langs=entries[1:])
    with pytest.raises(CanaryError, match="twice"):
        load(langs=entries + entries[-1:])
    with pytest.raises(CanaryError, match="file name inside"):
        load(langs=[dict(entries[0], model_file="../tokenizer.spl_tokens.model")] + entries[1:])
    with pytest.raises(CanaryError, match="Unknown tokenizer type"):
        load(type_="wordpiece")
    with pytest.raises(CanaryError, match="exactly one"):
        load(type_="spe")
    with pytest.raises(CanaryError, match="lists no"):
        load_tokenizer(built.model_dir, TokenizerConfig(type="aggregate", langs=[]))
    (tmp_path / "bad.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(CanaryError, match="corrupt"):
        load(langs=[{"lang": "spl_tokens", "model_file": "bad.model"}], model_dir=tmp_path)
    # A SentencePiece model without Canary's special tokens is rejected up front.
    with pytest.raises(CanaryError, match="not a Canary tokenizer"):
        load_tokenizer(built.model_dir, TokenizerConfig(type="spe", langs=[dict(entries[1], lang="all")]))


def test_load_accepts_dict_config(plain):
    built = plain["spe"]
    tok = load_tokenizer(str(built.model_dir), {"type": "spe", "langs": built.config.langs})
    assert tok.kind == "spe" and tok.vocab_size == built.config.langs[0]["vocab_size"]
