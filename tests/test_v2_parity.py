"""canary-1b-v2 with its CTC aligner: our defaults against NeMo's ``transcribe()`` from the files on.

The reference (tests/nemo_v2_oracle.py) is a random-weight v2-style model whose ``.nemo`` carries a tiny aligner
packed as the real one is; NeMo loaded every file itself, one file per call with its defaults (so its own
long-form path, parallel 30-40 s chunks merged by tokens, ran on the ~100 s file).
"""

from __future__ import annotations

import pytest

from mlx_canary.chunking import merge_chunk_tokens, plan_chunks
from mlx_canary.convert import convert
from mlx_canary.loading import load_model

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def v2(v2_oracle_dir, tmp_path_factory):
    import nemo_v2_oracle

    ref, arrays = nemo_v2_oracle.load_reference(v2_oracle_dir)
    out = tmp_path_factory.mktemp("v2") / "mlx"
    convert(str(v2_oracle_dir / ref["model"]), out, progress=lambda _line: None)
    return ref, arrays, load_model(out), v2_oracle_dir


def _single(ref: dict, name: str, timestamps: bool) -> dict:
    return next(r for r in ref["single"] if r["file"] == name and r["timestamps"] == timestamps)


def _options(rec: dict) -> dict:
    kw = rec["kwargs"]
    return dict(source_lang=kw["source_lang"], target_lang=kw["target_lang"], pnc=kw["pnc"] == "yes")


def test_the_oracle_is_what_it_claims(v2):
    """The reference exercises what the parity below relies on: the aligner was restored, the long file was
    chunked by NeMo, texts have words and segments, and no decision of NeMo's is a near-tie."""
    ref, arrays, _model, _root = v2
    assert ref["aligner"]["class"] == "EncDecCTCModelBPE" and ref["aligner"]["decoder_class"] == "ConvASRDecoder"
    assert {"timestamps_asr_model_config.yaml", "timestamps_asr_model_weights.ckpt"} <= set(
        ref["archive_members_added"])
    kinds = {f["kind"] for f in ref["files"]}
    assert {"mono16k", "short", "flac", "long"} <= kinds
    assert {f["lang"] for f in ref["files"]} >= {"en", "de", "es", "fr"}
    long = _single(ref, "long", False)
    assert long["chunked"] and len(long["chunk_lengths"]) >= 3
    assert next(f for f in ref["files"] if f["name"] == "long")["seconds"] > 90
    assert ref["findings"]["aed_min_margin"] > 1e-2
    assert ref["findings"]["viterbi_min_margin"] > 1e-2
    timed = [r for r in ref["single"] if r["timestamps"]]
    assert all(r["timestamp"] and r["timestamp"].get("word") for r in timed)
    assert sum(len(r["timestamp"]["segment"]) for r in timed) > len(timed)  # some texts have several segments
    assert arrays and all(a["T"] == arrays[a["array"]].shape[0] for a in ref["aligner_arrays"])


@pytest.mark.parametrize("name", ["en_fox", "en_stella", "de_morgen", "de_zahlen", "es_tiempo", "fr_paris",
                                  "en_short", "fr_paris_flac"])
def test_tokens_equal_nemo_without_timestamps(v2, name):
    ref, _arrays, model, root = v2
    rec = _single(ref, name, False)
    file = next(f for f in ref["files"] if f["name"] == name)
    result = model.transcribe(str(root / file["file"]), **_options(rec))
    assert result.tokens == rec["tokens"], name
    assert result.text == rec["text"].strip(), name


def test_long_file_equals_nemos_own_long_form_path(v2):
    """Our default for a >90 s file is NeMo's: the same chunk plan, the same chunk tokens (NeMo returns them
    concatenated as ``y_sequence``), the same token merge and text."""
    ref, _arrays, model, root = v2
    rec = _single(ref, "long", False)
    file = next(f for f in ref["files"] if f["name"] == "long")
    chunks = plan_chunks(file["samples"])
    assert [c.length for c in chunks] == rec["chunk_lengths"]
    assert max(c.size for c in chunks) == rec["chunk_size"]
    assert [t for chunk in rec["chunk_tokens"] for t in chunk] == rec["tokens"]

    result = model.transcribe(str(root / file["file"]), **_options(rec))
    assert result.tokens == merge_chunk_tokens(rec["chunk_tokens"])
    assert result.text == rec["text"]
