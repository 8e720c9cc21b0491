"""Tokenizers: Canary's aggregate tokenizer and its single-SentencePiece tokenizer, with NeMo-identical ids and text.

Two kinds exist in released checkpoints (reference §7):

* ``aggregate`` (canary-1b, canary-1b-flash, canary-180m-flash; NeMo ``CanaryTokenizer``): one SentencePiece
  model per language plus ``spl_tokens`` (the special tokens). Global id = local id + the summed vocabulary sizes
  of the sub-tokenizers before it, in config order. Decoding joins the raw pieces and turns ``▁`` into a space,
  so text keeps its leading space and special pieces appear verbatim.
* ``spe`` (canary-1b-v2; NeMo ``CanaryBPETokenizer``): one SentencePiece model with the special tokens inside;
  encoding and decoding are plain SentencePiece calls.

Ids outside ``[0, vocab_size)`` (the output head is padded to a multiple of 8, so untrained rows can be predicted)
are skipped by ``decode``; NeMo raises there instead.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Optional, Union

import sentencepiece

from .config import TokenizerConfig
from .errors import CanaryError, UnsupportedOption

BOS_PIECE = "<|startoftranscript|>"
EOS_PIECE = "<|endoftext|>"
PAD_PIECE = "<pad>"
NOSPEECH_PIECE = "<|nospeech|>"
CONTEXT_PIECE = "<|startofcontext|>"
TIMESTAMP_FLAG_PIECE = "<|timestamp|>"
SPECIAL_TOKENIZER = "spl_tokens"
SPACE_PIECE = "\u2581"

# NeMo's _map_canary1_to_canary2_lang: bare canary-1 codes fall back to these regional codes.
CANARY1_LANGUAGE_MAP = {"en": "en-US", "es": "es-ES", "fr": "fr-FR", "de": "de-DE"}

_TIMESTAMP_PIECE_RE = re.compile(r"<\|([0-9]+)\|>")
_LANGUAGE_PIECE_RE = re.compile(r"<\|([a-z]{2})(-[A-Z]{2})?\|>")

# ISO 639-1: a single SentencePiece has no list of languages, so a <|xx|> / <|xx-YY|> piece only counts as a
# language token when xx is a real language code (keeps e.g. a hypothetical <|ok|> control token out).
ISO_639_1 = frozenset(
    "aa ab ae af ak am an ar as av ay az ba be bg bh bi bm bn bo br bs ca ce ch co cr cs cu cv cy da de dv dz ee "
    "el en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho hr ht hu hy hz ia id ie ig ii ik io is "
    "it iu ja jv ka kg ki kj kk kl km kn ko kr ks ku kv kw ky la lb lg li ln lo lt lu lv mg mh mi mk ml mn mr ms "
    "mt my na nb nd ne ng nl nn no nr nv ny oc oj om or os pa pi pl ps pt qu rm rn ro ru rw sa sc sd se sg si sk "
    "sl sm sn so sq sr ss st su sv sw ta te tg th ti tk tl tn to tr ts tt tw ty ug uk ur uz ve vi vo wa wo xh yi "
    "yo za zh zu".split()
)


def is_special_piece(piece: str) -> bool:
    """NeMo's notion of a special token: ``<|...|>`` or ``<pad>``."""
    return (piece.startswith("<|") and piece.endswith("|>")) or piece == PAD_PIECE


def strip_language_token(lang: str) -> str:
    """``"<|en|>"`` -> ``"en"``; bare codes are returned unchanged."""
    if lang.startswith("<|") and lang.endswith("|>"):
        return lang[2:-2]
    return lang


def _load_sentencepiece(path: Path) -> sentencepiece.SentencePieceProcessor:
    if not path.is_file():
        raise CanaryError(f"Tokenizer model file not found: {path}. Re-run the conversion to recreate it.")
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as exc:
        raise CanaryError(f"Cannot read SentencePiece model {path} ({exc}); the file is corrupt.") from exc
    return sp


def _model_path(model_dir: Path, entry: dict) -> Path:
    name = str(entry.get("model_file", ""))
    # The converter writes bare file names; anything else would let a config point outside the model directory.
    if not name or Path(name).name != name or name in (".", ".."):
        raise CanaryError(f"Tokenizer entry {entry!r}: 'model_file' must be a file name inside {model_dir}.")
    return model_dir / name


class Tokenizer:
    """Interface shared by both tokenizer kinds. Ids are global (what the decoder embeds and predicts)."""

    kind: str = ""

    def __init__(self, pieces: list[str]):
        self._pieces = pieces
        self.vocab_size: int = len(pieces)
        self.special_tokens: dict[str, int] = self._find_special_tokens()
        self.special_ids: frozenset[int] = frozenset(self.special_tokens.values())
        self.bos_id: int = self._required_special(BOS_PIECE)
        self.eos_id: int = self._required_special(EOS_PIECE)
        self.pad_id: int = self._required_special(PAD_PIECE)
        self.nospeech_id: Optional[int] = self.special_tokens.get(NOSPEECH_PIECE)
        self._timestamp_values: dict[int, int] = {}
        for piece, token_id in self.special_tokens.items():
            match = _TIMESTAMP_PIECE_RE.fullmatch(piece)
            if match:
                self._timestamp_values[token_id] = int(match.group(1))
        self.timestamp_ids: tuple[int, ...] = tuple(sorted(self._timestamp_values))
        self.supports_timestamps: bool = TIMESTAMP_FLAG_PIECE in self.special_tokens and bool(self.timestamp_ids)

    # -- construction helpers -------------------------------------------------------------------------------
    def _find_special_tokens(self) -> dict[str, int]:
        raise NotImplementedError

    def _required_special(self, piece: str) -> int:
        token_id = self.special_tokens.get(piece)
        if token_id is None:
            raise CanaryError(f"The tokenizer has no {piece} token; this is not a Canary tokenizer.")
        return token_id

    # -- languages --------------------------------------------------------------------------------------------
    languages: tuple[str, ...] = ()

    def resolve_language(self, lang: str) -> str:
        """Canonical language code for ``lang`` (``"en"`` or ``"<|en|>"``), or CanaryError listing the choices.

        Like NeMo, a bare 2-letter canary-1 code that is not a language of this model falls back to its regional
        form (``en`` -> ``en-US``) when the model has that one.
        """
        if not isinstance(lang, str):
            raise CanaryError(f"Language must be a string such as 'en', got {lang!r}.")
        code = strip_language_token(lang.strip())
        if code in self.languages:
            return code
        mapped = CANARY1_LANGUAGE_MAP.get(code) if len(code) == 2 else None
        if mapped is not None and mapped in self.languages:
            return mapped
        choices = ", ".join(self.languages) or "(none)"
        raise UnsupportedOption(f"Unsupported language {lang!r}. This model supports: {choices}.")

    def language_token_id(self, lang: str) -> int:
        """Id of the ``<|xx|>`` prompt token for ``lang`` (validated with ``resolve_language``)."""
        code = self.resolve_language(lang)
        token_id = self.special_tokens.get(f"<|{code}|>")
        if token_id is None:
            raise UnsupportedOption(f"Language {code!r} has no <|{code}|> token in this tokenizer; it cannot be prompted.")
        return token_id

    def language_of(self, token_id: int) -> Optional[str]:
        """The language whose ``<|xx|>`` token is ``token_id`` (language ID), else None."""
        piece = self.id_to_piece(token_id) if 0 <= token_id < self.vocab_size else ""
        if piece in self.special_tokens:
            code = strip_language_token(piece)
            if code in self.languages:
                return code
        return None

    # -- pieces -----------------------------------------------------------------------------------------------
    def id_to_piece(self, token_id: int) -> str:
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise CanaryError(f"Token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1}).")
        return self._pieces[token_id]

    def token_to_id(self, piece: str, lang: Optional[str] = None) -> int:
        raise NotImplementedError

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self.special_ids

    def is_timestamp(self, token_id: int) -> bool:
        return int(token_id) in self._timestamp_values

    def timestamp_value(self, token_id: int) -> int:
        """Encoder-frame index N of a ``<|N|>`` token."""
        try:
            return self._timestamp_values[int(token_id)]
        except KeyError:
            raise CanaryError(f"Token id {token_id} is not a timestamp token.") from None

    # -- text -------------------------------------------------------------------------------------------------
    def encode(self, text: str, lang: Optional[str] = None) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def _in_vocab(self, ids: Iterable[int]) -> list[int]:
        out = []
        for token_id in ids:
            token_id = int(token_id)
            if 0 <= token_id < self.vocab_size:
                out.append(token_id)
        return out


class AggregateTokenizer(Tokenizer):
    """NeMo ``CanaryTokenizer``: per-language SentencePiece models behind one id space."""

    kind = "aggregate"

    def __init__(self, entries: list[tuple[str, sentencepiece.SentencePieceProcessor]]):
        self._sub: dict[str, sentencepiece.SentencePieceProcessor] = {}
        self.offsets: dict[str, int] = {}
        pieces: list[str] = []
        for lang, sp in entries:
            self._sub[lang] = sp
            self.offsets[lang] = len(pieces)
            pieces.extend(sp.IdToPiece(i) for i in range(sp.GetPieceSize()))
        if SPECIAL_TOKENIZER not in self._sub:
            raise CanaryError(f"Aggregate tokenizer config has no '{SPECIAL_TOKENIZER}' entry.")
        self.languages = tuple(lang for lang in self._sub if lang != SPECIAL_TOKENIZER)
        super().__init__(pieces)

    def _find_special_tokens(self) -> dict[str, int]:
        # As NeMo: only the spl_tokens model contributes, and a repeated piece keeps its first id (piece_to_id).
        sp = self._sub[SPECIAL_TOKENIZER]
        offset = self.offsets[SPECIAL_TOKENIZER]
        found: dict[str, int] = {}
        for local in range(sp.GetPieceSize()):
            piece = sp.IdToPiece(local)
            if is_special_piece(piece):
                found[piece] = sp.PieceToId(piece) + offset
        return found

    def _sub_language(self, lang: Optional[str]) -> str:
        if lang is None:
            raise CanaryError(f"An aggregate tokenizer needs a language to encode text; choose one of: "
                              f"{', '.join(self.languages)}.")
        return self.resolve_language(lang)

    def encode(self, text: str, lang: Optional[str] = None) -> list[int]:
        """SentencePiece ids of ``text`` from ``lang``'s model, shifted to global ids (NeMo ``text_to_ids``
        without its EOS / timestamp training conveniences)."""
        code = self._sub_language(lang)
        offset = self.offsets[code]
        return [local + offset for local in self._sub[code].EncodeAsIds(text)]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self._pieces[i] for i in self._in_vocab(ids)).replace(SPACE_PIECE, " ")

    def token_to_id(self, piece: str, lang: Optional[str] = None) -> int:
        """Global id of ``piece``: in ``lang``'s model (``"spl_tokens"`` allowed), else the special tokens, then
        the sub-tokenizers in config order."""
        if lang is not None:
            code = lang if lang == SPECIAL_TOKENIZER else self.resolve_language(lang)
            order = [code]
        else:
            if piece in self.special_tokens:
                return self.special_tokens[piece]
            order = list(self._sub)
        for code in order:
            sp = self._sub[code]
            local = sp.PieceToId(piece)
            if sp.IdToPiece(local) == piece:
                return local + self.offsets[code]
        where = f"the '{lang}' tokenizer" if lang is not None else "the tokenizer"
        raise CanaryError(f"Token {piece!r} is not in {where}.")


class SpeTokenizer(Tokenizer):
    """NeMo ``CanaryBPETokenizer``: a single SentencePiece model holding text and special pieces."""

    kind = "spe"

    def __init__(self, sp: sentencepiece.SentencePieceProcessor):
        self._sp = sp
        super().__init__([sp.IdToPiece(i) for i in range(sp.GetPieceSize())])
        langs = []
        for piece in self.special_tokens:
            match = _LANGUAGE_PIECE_RE.fullmatch(piece)
            if match and match.group(1) in ISO_639_1:
                langs.append(strip_language_token(piece))
        self.languages = tuple(langs)

    def _find_special_tokens(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for token_id, piece in enumerate(self._pieces):
            if is_special_piece(piece) and piece not in found:
                found[piece] = token_id
        return found

    def encode(self, text: str, lang: Optional[str] = None) -> list[int]:
        """Plain ``encode_as_ids``; ``lang`` is accepted for interface symmetry and only validated."""
        if lang is not None:
            self.resolve_language(lang)
        return list(self._sp.EncodeAsIds(text))

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.DecodeIds(self._in_vocab(ids))

    def token_to_id(self, piece: str, lang: Optional[str] = None) -> int:
        token_id = self._sp.PieceToId(piece)
        if self._pieces[token_id] != piece:
            raise CanaryError(f"Token {piece!r} is not in the tokenizer.")
        return token_id


def load_tokenizer(model_dir: Union[str, Path], tokenizer_config: Union[TokenizerConfig, dict]) -> Tokenizer:
    """Build the tokenizer described by ``tokenizer_config`` from the SentencePiece files in ``model_dir``."""
    if isinstance(tokenizer_config, dict):
        tokenizer_config = TokenizerConfig(**tokenizer_config)
    model_dir = Path(model_dir)
    entries = list(tokenizer_config.langs)
    if not entries:
        raise CanaryError("The tokenizer config lists no SentencePiece models; re-run the conversion.")

    loaded: list[tuple[str, sentencepiece.SentencePieceProcessor]] = []
    for entry in entries:
        lang = entry.get("lang")
        if not lang:
            raise CanaryError(f"Tokenizer entry {entry!r} has no 'lang'.")
        if any(lang == seen for seen, _ in loaded):
            raise CanaryError(f"Tokenizer config lists language {lang!r} twice.")
        sp = _load_sentencepiece(_model_path(model_dir, entry))
        expected = entry.get("vocab_size")
        if expected is not None and int(expected) != sp.GetPieceSize():
            raise CanaryError(
                f"Tokenizer {entry['model_file']} has {sp.GetPieceSize()} pieces but the config says {expected}; "
                "the model directory is inconsistent."
            )
        loaded.append((lang, sp))

    if tokenizer_config.type == "aggregate":
        return AggregateTokenizer(loaded)
    if tokenizer_config.type == "spe":
        if len(loaded) != 1:
            raise CanaryError(f"A 'spe' tokenizer has exactly one model, the config lists {len(loaded)}.")
        return SpeTokenizer(loaded[0][1])
    raise CanaryError(f"Unknown tokenizer type {tokenizer_config.type!r} (expected 'aggregate' or 'spe').")
