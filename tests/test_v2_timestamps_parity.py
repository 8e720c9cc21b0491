"""canary-1b-v2 timestamps through its CTC aligner, against NeMo's ``transcribe(timestamps=True)`` from the files on.

The reference is the v2 oracle (tests/nemo_v2_oracle.py): a random-weight v2-style ``.nemo`` with a tiny aligner
packed as the real one is; NeMo loaded each file itself, one file per call. With the aligner NeMo prompts
``<|notimestamp|>`` (the tokens equal the no-timestamp ones) and force-aligns the text: every word and segment
start/end must be equal, as NeMo rounds them. The long file (NeMo's long-form path with char-level alignment before
the merge) is tested with that path in test_v2_parity.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from mlx_canary import audio
from mlx_canary.aed import pad_to_min_duration
from mlx_canary.errors import UnsupportedOption
from mlx_canary.forced_alignment import plan_utterance, viterbi
from nemo_v2_oracle import single_record

pytestmark = pytest.mark.parity

SHORT_FILES = ["en_fox", "en_stella", "de_morgen", "de_zahlen", "es_tiempo", "fr_paris", "en_short", "fr_paris_flac"]


def _nemo(entries: list, key: str) -> list:
    return [{"text": e[key], "start": e["start"], "end": e["end"], "start_offset": e["start_offset"],
             "end_offset": e["end_offset"]} for e in entries]


def _file(ref: dict, root, name: str) -> str:
    return str(root / next(f for f in ref["files"] if f["name"] == name)["file"])


@pytest.mark.parametrize("name", SHORT_FILES)
def test_word_and_segment_times_equal_nemo(v2, name):
    ref, _arrays, model, root = v2
    rec = single_record(ref, name, True)
    kw = rec["kwargs"]
    result = model.transcribe(_file(ref, root, name), source_lang=kw["source_lang"], target_lang=kw["target_lang"],
                              pnc=kw["pnc"] == "yes", timestamps=True)
    assert result.tokens == rec["tokens"] == single_record(ref, name, False)["tokens"]  # <|notimestamp|>, as NeMo
    assert result.text == rec["text"].strip()
    assert result.words == _nemo(rec["timestamp"]["word"], "word")
    assert result.segments == _nemo(rec["timestamp"]["segment"], "segment")


def test_aligner_log_probs_and_paths_equal_nemo(v2):
    """Below the times: the aligner's log-probs of each file and NeMo's Viterbi path through them."""
    ref, arrays, model, root = v2
    aligner = model.engine.aligner
    # whole short files here; the long file's chunks (aligned at token level) are checked in test_v2_parity.py
    for rec in (a for a in ref["aligner_arrays"] if "chunk" not in a):
        want = arrays[rec["array"]]
        wave = audio.load(_file(ref, root, rec["file"]))
        got = aligner.log_probs(pad_to_min_duration(wave, model.engine.framing.min_samples))
        assert got.shape == want.shape, rec["file"]
        # float32 in another summation order (MLX vs torch kernels): ~2e-5 relative on these peaked log-probs
        # (values down to -30); the Viterbi margins (>= 0.048) are far above it.
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=5e-5)
        utt = plan_utterance(rec["text"], aligner.vocab, rec["T"])
        assert utt.targets == rec["y"]
        assert viterbi(got, utt.targets) == rec["alignment"], rec["file"]


def test_translation_with_timestamps_is_refused_where_nemo_aligns_the_translation(v2):
    """NeMo aligns the German translation against the English speech's CTC log-probs (recorded in ``ast``): times
    of words nobody spoke. We refuse the combination instead of reproducing it."""
    ref, _arrays, model, root = v2
    ast = ref["ast"]
    assert ast["timestamps"] and ast["timestamp"]["word"]  # what NeMo does
    kw = ast["kwargs"]
    with pytest.raises(UnsupportedOption, match="translation"):
        model.transcribe(_file(ref, root, ast["file"]), source_lang=kw["source_lang"], target_lang=kw["target_lang"],
                         timestamps=True)
    plain = model.transcribe(_file(ref, root, ast["file"]), source_lang=kw["source_lang"], target_lang=kw["target_lang"])
    assert plain.tokens == ast["tokens"]  # the translation itself is NeMo's
