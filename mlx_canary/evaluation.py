"""Scoring predictions against reference text: WER for transcription, BLEU for translation, overall and per
language, with NeMo's text normalisation options. Needs the ``eval`` extra (``jiwer``, ``sacrebleu``).

WER is what NeMo's ``cal_write_wer`` (``nemo.collections.asr.parts.utils.eval_utils``) reports for the same
predictions manifest: word edit distance summed over the rows divided by the reference words summed over the
rows (jiwer computes the same corpus-level ratio), the texts stripped. Its normalisation options, in its order:

* ``clean`` (``clean_groundtruth_text``, the reference only): lower-cased; the characters ``` `¨´‘’“”ʻ" ```
  dropped; ``/?*",.:=_{|}~¨«·»¡¿„…‧‹›≪≫!:;ː→`` turned into spaces; for English, whole-number words spelled as
  digit words (``12`` -> ``one two``); spaces collapsed;
* ``punctuation`` (``ignore_punctuation``, both sides): ASCII punctuation ``!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~``
  deleted (not turned into spaces); otherwise ``punct-space`` (``strip_punc_space``): the spaces between a word
  character and ``.,;!?`` removed;
* ``case`` (``ignore_capitalization``, both sides): lower-cased.

BLEU is sacrebleu's corpus BLEU with its defaults (13a tokenisation), per source/target pair and overall.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

from .errors import CanaryError

NORMALIZATIONS = ("clean", "punctuation", "punct-space", "case")
REFERENCE_FIELDS = ("text", "answer")  # NeMo's cal_write_wer reads "text"; Canary's manifests use "answer"

_ASCII_PUNCTUATION = '!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~'
_CLEAN_DROP = "`¨´‘’“”ʻ\""
_CLEAN_SPACE = "/?*\",.:=_{|}~¨«·»¡¿„…‧‹›≪≫!:;ː→"
_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class MissingExtra(CanaryError):
    """jiwer / sacrebleu are not installed."""


def parse_normalizations(value: str) -> tuple:
    """``"case,punctuation"`` -> the names, checked."""
    names = tuple(dict.fromkeys(n.strip().lower() for n in value.split(",") if n.strip()))
    unknown = [n for n in names if n not in NORMALIZATIONS]
    if unknown:
        raise CanaryError(f"unknown normalisation {', '.join(unknown)}; choose from {', '.join(NORMALIZATIONS)}")
    return names


def _spell_digits(text: str) -> str:
    """NeMo's basic English number spelling: a word made only of digits becomes its digits' names."""
    words = []
    for word in text.split():
        if word.isdecimal() and int(word) != 0:
            words.extend(_DIGIT_WORDS[int(d)] for d in str(int(word)))
        elif not word.isdecimal():
            words.append(word)
        # "0" / "00": NeMo's loop over the number's digits writes nothing for zero
    return " ".join(words)


def clean_reference(text: str, lang: str = "en") -> str:
    text = text.strip().lower()
    text = text.translate({ord(c): None for c in _CLEAN_DROP})
    text = text.translate({ord(c): " " for c in _CLEAN_SPACE})
    if lang == "en":
        text = _spell_digits(text)
    return " ".join(text.split())


def normalize_pair(reference: str, hypothesis: str, names: Iterable[str], lang: str = "en") -> tuple[str, str]:
    """``(reference, hypothesis)`` normalised as ``cal_write_wer`` does with the options ``names``."""
    names = set(names)
    reference, hypothesis = reference.strip(), hypothesis.strip()
    if "clean" in names:
        reference = clean_reference(reference, lang)
    if "punctuation" in names:
        table = {ord(c): None for c in _ASCII_PUNCTUATION}
        reference, hypothesis = reference.translate(table), hypothesis.translate(table)
    elif "punct-space" in names:
        reference = re.sub(r"(\w)\s+([.,;!?])", r"\1\2", reference)
        hypothesis = re.sub(r"(\w)\s+([.,;!?])", r"\1\2", hypothesis)
    if "case" in names:
        reference, hypothesis = reference.lower(), hypothesis.lower()
    return reference, hypothesis


@dataclass
class Score:
    metric: str  # "wer" or "bleu"
    value: float  # WER as a fraction; BLEU 0-100
    items: int
    words: int = 0  # reference words (WER)

    def to_dict(self) -> dict:
        return {"metric": self.metric, "value": self.value, "items": self.items, "words": self.words}


@dataclass
class Evaluation:
    wer: Optional[Score] = None  # every transcription row
    bleu: Optional[Score] = None  # every translation row
    per_language: dict = field(default_factory=dict)  # "en" (WER) or "de>en" (BLEU) -> Score

    def to_dict(self) -> dict:
        return {"wer": self.wer.to_dict() if self.wer else None, "bleu": self.bleu.to_dict() if self.bleu else None,
                "per_language": {k: v.to_dict() for k, v in sorted(self.per_language.items())}}

    def lines(self) -> list[str]:
        out = []
        if self.wer:
            out.append(f"WER {100 * self.wer.value:.2f}% over {self.wer.items} items ({self.wer.words} words)")
        if self.bleu:
            out.append(f"BLEU {self.bleu.value:.2f} over {self.bleu.items} items")
        if len(self.per_language) > 1:
            for name, score in sorted(self.per_language.items()):
                value = f"WER {100 * score.value:.2f}%" if score.metric == "wer" else f"BLEU {score.value:.2f}"
                out.append(f"  {name}: {value} ({score.items} items)")
        return out


def reference_of(row: dict) -> Optional[str]:
    for name in REFERENCE_FIELDS:
        if isinstance(row.get(name), str):
            return row[name]
    return None


def word_error_rate(references: list, hypotheses: list) -> tuple[float, int]:
    """Corpus WER (summed edits / summed reference words) and the reference word count."""
    import jiwer

    words = sum(len(r.split()) for r in references)
    if words == 0:
        return float("inf"), 0  # as NeMo: no reference words, no rate
    # Words split on any whitespace (as NeMo's str.split()); jiwer's own splitting is on single spaces.
    out = jiwer.process_words([" ".join(r.split()) for r in references], [" ".join(h.split()) for h in hypotheses])
    errors = out.substitutions + out.deletions + out.insertions
    return errors / words, words


def bleu(references: list, hypotheses: list) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


def evaluate(rows: list, languages: list, normalize: Iterable[str] = ()) -> Optional[Evaluation]:
    """Score ``rows`` (``pred_text`` against ``text`` / ``answer``); ``languages[i]`` is row i's
    ``(source, target)``: equal for transcription (WER), different for translation (BLEU). Rows without a
    reference are left out; None when no row has one."""
    try:
        import jiwer  # noqa: F401
        import sacrebleu  # noqa: F401
    except ImportError:
        raise MissingExtra("scoring needs the eval extra: pip install 'mlx-canary[eval]'") from None
    normalize = tuple(normalize)
    asr: dict = {}
    ast: dict = {}
    for row, (source, target) in zip(rows, languages):
        reference = reference_of(row)
        if reference is None:
            continue
        hypothesis = str(row.get("pred_text", ""))
        if source == target:
            pair = normalize_pair(reference, hypothesis, normalize, lang=source)
            asr.setdefault(source, ([], []))
            asr[source][0].append(pair[0])
            asr[source][1].append(pair[1])
        else:
            ast.setdefault(f"{source}>{target}", ([], []))
            ast[f"{source}>{target}"][0].append(reference.strip())
            ast[f"{source}>{target}"][1].append(hypothesis.strip())
    if not asr and not ast:
        return None
    result = Evaluation()
    for name, (refs, hyps) in asr.items():
        value, words = word_error_rate(refs, hyps)
        result.per_language[name] = Score("wer", value, len(refs), words)
    for name, (refs, hyps) in ast.items():
        result.per_language[name] = Score("bleu", bleu(refs, hyps), len(refs))
    if asr:
        refs = [r for group in asr.values() for r in group[0]]
        hyps = [h for group in asr.values() for h in group[1]]
        value, words = word_error_rate(refs, hyps)
        result.wer = Score("wer", value, len(refs), words)
    if ast:
        refs = [r for group in ast.values() for r in group[0]]
        hyps = [h for group in ast.values() for h in group[1]]
        result.bleu = Score("bleu", bleu(refs, hyps), len(refs))
    return result
