"""Prompts: the decoder prompt ids of the ``canary`` (v1) and ``canary2`` formats, exactly as NeMo builds them.

* ``canary`` (canary-1b): ``<|startoftranscript|> <|src|> <|transcribe|>|<|translate|> <|tgt|> <|pnc|>|<|nopnc|>``.
* ``canary2`` (flash models, canary-1b-v2): ``<|startofcontext|> context <|startoftranscript|> emotion <|src|>
  <|tgt|> pnc itn timestamp diarize``; there is no task token (translation = source != target).

How the ids come out depends on the tokenizer, as in NeMo: an aggregate tokenizer looks every special token up
literally and tokenises the decoder context with the *target* language's SentencePiece model; a single
SentencePiece tokenizer (``spe``) encodes the whole prompt string in one call, which may add a leading ``▁``
piece (reference §7.2).
"""

from __future__ import annotations

from typing import Optional, Union

from .errors import CanaryError, UnsupportedOption
from .tokenizer import BOS_PIECE, CONTEXT_PIECE, Tokenizer

PROMPT_FORMATS = ("canary", "canary2")
EMOTIONS = ("<|emo:undefined|>", "<|emo:neutral|>", "<|emo:angry|>", "<|emo:happy|>", "<|emo:sad|>")
DEFAULT_EMOTION = EMOTIONS[0]

# NeMo's manifest vocabulary (nemo.collections.common.prompts.canary / canary2).
_TRUE = {"yes", "Yes", "true", "True", "1"}
_FALSE = {"no", "No", "false", "False", "0"}
TRANSCRIBE_TASKS = frozenset({"asr", "transcribe", "<|transcribe|>"})
TRANSLATE_TASKS = frozenset({"ast", "translate", "s2t_translation", "<|translate|>"})

Flag = Union[bool, str]

# A prompt is a list of parts: a special piece, or (context text, language of the sub-tokenizer).
_Part = Union[str, tuple]


def _flag(value: Flag, name: str) -> bool:
    """Accepts a bool or NeMo's slot strings (``yes``/``no``, ``pnc``/``nopnc``, ``<|pnc|>``/``<|nopnc|>``...).

    NeMo itself maps ``"Yes"`` to the negative token (its mapping only knows lower-case ``yes``); here it means yes.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value in _TRUE or value in (name, f"<|{name}|>"):
            return True
        if value in _FALSE or value in (f"no{name}", f"<|no{name}|>"):
            return False
    raise CanaryError(f"Invalid value {value!r} for '{name}': use True/False (or 'yes'/'no').")


def _emotion(value: str) -> str:
    if isinstance(value, str):
        name = value.strip()
        if name.startswith("<|") and name.endswith("|>"):
            name = name[2:-2]
        if not name.startswith("emo:"):
            name = "emo:" + name
        piece = f"<|{name}|>"
        if piece in EMOTIONS:
            return piece
    choices = ", ".join(e[6:-2] for e in EMOTIONS)
    raise CanaryError(f"Invalid emotion {value!r}; choose one of: {choices}.")


def _is_translation(task: Optional[str], source: str, target: str) -> bool:
    if task is None:
        return source != target
    if task in TRANSLATE_TASKS:
        return True
    if task in TRANSCRIBE_TASKS:
        return False
    raise CanaryError(f"Invalid task {task!r}; use 'transcribe' (asr) or 'translate' (ast).")


def _check_context(context: str) -> None:
    if not isinstance(context, str):
        raise CanaryError(f"The decoder context must be a string, got {type(context).__name__}.")
    # NeMo finds the prompt's special tokens by scanning for '<|' and '>'; markup inside the context would be
    # misparsed (aggregate) or turned into control tokens (spe), so it is refused rather than mis-encoded.
    if "<|" in context:
        raise CanaryError("The decoder context must not contain '<|' (special-token markup).")


def _check_format(prompt_format: str) -> None:
    if prompt_format not in PROMPT_FORMATS:
        raise CanaryError(f"Unknown prompt format {prompt_format!r}; expected one of {', '.join(PROMPT_FORMATS)}.")


def _prompt_parts(
    tokenizer: Tokenizer,
    prompt_format: str,
    *,
    source_lang: str,
    target_lang: str,
    pnc: Flag,
    timestamps: Flag,
    itn: Flag,
    diarize: Flag,
    emotion: str,
    context: str,
    task: Optional[str],
) -> list[_Part]:
    _check_format(prompt_format)
    src = tokenizer.resolve_language(source_lang)
    tgt = tokenizer.resolve_language(target_lang)
    src_piece, tgt_piece = f"<|{src}|>", f"<|{tgt}|>"
    pnc_piece = "<|pnc|>" if _flag(pnc, "pnc") else "<|nopnc|>"
    want_timestamps = _flag(timestamps, "timestamp")
    want_itn = _flag(itn, "itn")
    want_diarize = _flag(diarize, "diarize")
    emotion_piece = _emotion(emotion)
    _check_context(context)
    translate = _is_translation(task, src, tgt)

    if prompt_format == "canary":
        if want_timestamps:
            raise UnsupportedOption("This model does not predict timestamps (canary v1 prompt format).")
        unsupported = [
            name
            for name, used in (
                ("context", bool(context)),
                ("itn", want_itn),
                ("diarize", want_diarize),
                ("emotion", emotion_piece != DEFAULT_EMOTION),
            )
            if used
        ]
        if unsupported:
            raise UnsupportedOption(f"The canary v1 prompt format has no {', '.join(unsupported)} option.")
        task_piece = "<|translate|>" if translate else "<|transcribe|>"
        return [BOS_PIECE, src_piece, task_piece, tgt_piece, pnc_piece]

    if want_timestamps and not tokenizer.supports_timestamps:
        raise UnsupportedOption("This model does not predict timestamps (its tokenizer has no timestamp tokens).")
    if task is not None and translate != (src != tgt):
        raise CanaryError(
            f"canary2 models translate exactly when source and target languages differ; task={task!r} "
            f"contradicts source_lang={src!r}, target_lang={tgt!r}."
        )
    parts: list[_Part] = [CONTEXT_PIECE]
    if context:
        parts.append((context, tgt))
    parts += [
        BOS_PIECE,
        emotion_piece,
        src_piece,
        tgt_piece,
        pnc_piece,
        "<|itn|>" if want_itn else "<|noitn|>",
        "<|timestamp|>" if want_timestamps else "<|notimestamp|>",
        "<|diarize|>" if want_diarize else "<|nodiarize|>",
    ]
    return parts


def _encode_parts(tokenizer: Tokenizer, parts: list[_Part]) -> list[int]:
    for part in parts:
        if isinstance(part, str) and part not in tokenizer.special_tokens:
            raise UnsupportedOption(f"This model's tokenizer has no {part} token, so this prompt option is unavailable.")
    if tokenizer.kind == "spe":
        # NeMo runs the whole prompt string through one SentencePiece encode (CanaryBPETokenizer.text_to_ids).
        return tokenizer.encode(_parts_to_text(parts))
    ids: list[int] = []
    for part in parts:
        if isinstance(part, str):
            ids.append(tokenizer.special_tokens[part])
        else:
            text, lang = part
            ids.extend(tokenizer.encode(text, lang))
    return ids


def _parts_to_text(parts: list[_Part]) -> str:
    return "".join(part if isinstance(part, str) else part[0] for part in parts)


def format_prompt(
    tokenizer: Tokenizer,
    prompt_format: str,
    *,
    source_lang: str,
    target_lang: str,
    pnc: Flag = True,
    timestamps: Flag = False,
    itn: Flag = False,
    diarize: Flag = False,
    emotion: str = DEFAULT_EMOTION,
    context: str = "",
    task: Optional[str] = None,
) -> str:
    """The prompt as NeMo's template string (for logs and debugging); same arguments as ``build_prompt``."""
    return _parts_to_text(
        _prompt_parts(
            tokenizer, prompt_format, source_lang=source_lang, target_lang=target_lang, pnc=pnc,
            timestamps=timestamps, itn=itn, diarize=diarize, emotion=emotion, context=context, task=task,
        )
    )


def build_prompt(
    tokenizer: Tokenizer,
    prompt_format: str,
    *,
    source_lang: str,
    target_lang: str,
    pnc: Flag = True,
    timestamps: Flag = False,
    itn: Flag = False,
    diarize: Flag = False,
    emotion: str = DEFAULT_EMOTION,
    context: str = "",
    task: Optional[str] = None,
) -> list[int]:
    """Prompt token ids for one utterance.

    Languages are codes (``"en"``) or tokens (``"<|en|>"``) of ``tokenizer.languages``. ``task`` (``transcribe``/
    ``asr`` or ``translate``/``ast``) defaults to translate iff the languages differ; canary v1 puts it in the
    prompt, canary2 only checks it agrees with the languages. ``context`` (canary2 only) is free text that biases
    the decoder. ``timestamps``, ``itn``, ``diarize``, ``emotion`` and ``context`` are refused by the canary v1
    format; ``timestamps`` also needs a tokenizer with timestamp tokens (``tokenizer.supports_timestamps``).
    """
    parts = _prompt_parts(
        tokenizer, prompt_format, source_lang=source_lang, target_lang=target_lang, pnc=pnc,
        timestamps=timestamps, itn=itn, diarize=diarize, emotion=emotion, context=context, task=task,
    )
    return _encode_parts(tokenizer, parts)


def build_lid_prompt(
    tokenizer: Tokenizer, prompt_format: str, *, context: str = "", context_lang: Optional[str] = None
) -> list[int]:
    """Prompt for language identification.

    canary2: NeMo's ``user_partial`` role, ``<|startofcontext|>{context}<|startoftranscript|>``; the model then
    predicts the emotion token and then the source-language token (decode two steps; map the second with
    ``tokenizer.language_of``). With an aggregate tokenizer a non-empty ``context`` needs ``context_lang`` (NeMo
    cannot encode this case at all). canary v1 (not a NeMo role): ``<|startoftranscript|>`` alone, after which
    the model's first token is the source language.
    """
    _check_format(prompt_format)
    _check_context(context)
    if prompt_format == "canary":
        if context:
            raise UnsupportedOption("The canary v1 prompt format has no context option.")
        parts: list[_Part] = [BOS_PIECE]
    else:
        parts = [CONTEXT_PIECE]
        if context:
            if tokenizer.kind == "aggregate":
                if context_lang is None:
                    raise CanaryError("A context needs context_lang (the language to tokenise it with).")
                lang = tokenizer.resolve_language(context_lang)
            else:
                lang = None
            parts.append((context, lang))
        parts.append(BOS_PIECE)
    return _encode_parts(tokenizer, parts)
