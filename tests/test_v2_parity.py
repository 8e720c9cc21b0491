"""canary-1b-v2 with its CTC aligner: our defaults against NeMo's ``transcribe()`` from the files on.

The reference (tests/nemo_v2_oracle.py) is a random-weight v2-style model whose ``.nemo`` carries a tiny aligner
packed as the real one is; NeMo loaded every file itself, one file per call with its defaults (so its own
long-form path, parallel 30-40 s chunks merged by tokens, ran on the ~100 s file).
"""

from __future__ import annotations

import numpy as np
import pytest

from mlx_canary.audio import load_audio
from mlx_canary.chunking import merge_aligned_chunks, merge_chunk_tokens, plan_chunks
from nemo_v2_oracle import single_record

pytestmark = pytest.mark.parity


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
    long = single_record(ref, "long", False)
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
    rec = single_record(ref, name, False)
    file = next(f for f in ref["files"] if f["name"] == name)
    result = model.transcribe(str(root / file["file"]), **_options(rec))
    assert result.tokens == rec["tokens"], name
    assert result.text == rec["text"].strip(), name


def test_long_file_equals_nemos_own_long_form_path(v2):
    """Our default for a >90 s file is NeMo's: the same chunk plan, the same chunk tokens (NeMo returns them
    concatenated as ``y_sequence``), the same token merge and text."""
    ref, _arrays, model, root = v2
    rec = single_record(ref, "long", False)
    file = next(f for f in ref["files"] if f["name"] == "long")
    chunks = plan_chunks(file["samples"])
    assert [c.length for c in chunks] == rec["chunk_lengths"]
    assert max(c.size for c in chunks) == rec["chunk_size"]
    assert [t for chunk in rec["chunk_tokens"] for t in chunk] == rec["tokens"]

    result = model.transcribe(str(root / file["file"]), **_options(rec))
    assert result.tokens == merge_chunk_tokens(rec["chunk_tokens"])
    assert result.text == rec["text"]


def _nemo_entries(entries: list[dict], key: str) -> list[dict]:
    """NeMo's word/segment dicts in our shape (its text key is "word" / "segment")."""
    return [{"text": e[key], **{k: e[k] for k in ("start", "end", "start_offset", "end_offset")}} for e in entries]


def test_aligned_chunk_merge_equals_nemos_from_the_chunks_nemo_aligned(v2_oracle_dir):
    """The pure merge (``chunking.merge_aligned_chunks``) on the per-token times NeMo's aligner gave each chunk of
    the long file gives NeMo's text, words and segments exactly (float times included)."""
    import nemo_v2_oracle
    import sentencepiece

    ref, _arrays = nemo_v2_oracle.load_reference(v2_oracle_dir)
    rec = single_record(ref, "long", True)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(v2_oracle_dir / "tokenizer.model"))
    chunks = [ts["char"] for ts in rec["chunk_timestamps"]]
    assert len(chunks) == len(rec["chunk_enc_len"]) >= 3
    merged = merge_aligned_chunks(chunks, rec["chunk_enc_len"], lambda ids: sp.decode_ids(list(ids)))
    assert merged.text == rec["text"]
    assert merged.words == _nemo_entries(rec["timestamp"]["word"], "word")
    assert merged.segments == _nemo_entries(rec["timestamp"]["segment"], "segment")
    assert len(merged.segments) > 1


def test_long_file_timestamps_equal_nemos_own_long_form_path(v2):
    """``timestamps=True`` on the >90 s file: NeMo aligns every chunk's text token by token, merges the aligned
    tokens and rebuilds words and segments; ours gives the same merged tokens, text and every word and segment
    (text, start, end, offsets: offset x 0.08 unrounded after the merge, as NeMo). The short files' timestamps are
    tested in test_v2_timestamps_parity.py."""
    ref, _arrays, model, root = v2
    rec = single_record(ref, "long", True)
    assert rec["chunked"] and len(rec["timestamp"]["segment"]) > 1
    file = next(f for f in ref["files"] if f["name"] == "long")
    result = model.transcribe(str(root / file["file"]), timestamps=True, **_options(rec))
    assert result.tokens == merge_chunk_tokens([[t["token_id"] for t in ts["char"]] for ts in rec["chunk_timestamps"]])
    assert result.text == rec["text"]
    assert result.words == _nemo_entries(rec["timestamp"]["word"], "word")
    assert result.segments == _nemo_entries(rec["timestamp"]["segment"], "segment")


def test_translation_tokens_equal_nemo(v2):
    """en -> de speech translation (NeMo's ``ast`` record: prompted ``<|notimestamp|>`` as always with an aligner).
    Timestamps for it are refused (test_v2_timestamps_parity.py): NeMo times words nobody said."""
    ref, _arrays, model, root = v2
    rec = ref["ast"]
    assert rec["kwargs"]["target_lang"] != rec["kwargs"]["source_lang"]
    file = next(f for f in ref["files"] if f["name"] == rec["file"])
    assert model.transcribe(str(root / file["file"]), **_options(rec)).tokens == rec["tokens"]


def test_aligner_log_probs_of_each_chunk_equal_nemos_batched_pass(v2):
    """NeMo runs its aligner on all chunks of the long file as one zero-padded batch; our aligner runs each chunk
    alone. The log-probs agree on every valid frame (the short last chunk included: NeMo's zero padding does not
    reach it), and our Viterbi path through our log-probs is NeMo's path. float32 rounding over 450-frame chunks
    leaves up to ~5e-4 on log-probs of magnitude 20-35 (the same on the unpadded chunks; 2e-4 on the 3-6 s clips),
    far below the smallest Viterbi decision gap the oracle records (``viterbi_min_margin``)."""
    from mlx_canary.forced_alignment import viterbi

    ref, arrays, model, root = v2
    file = next(f for f in ref["files"] if f["name"] == "long")
    samples = load_audio(str(root / file["file"]))
    chunks = plan_chunks(len(samples))
    entries = sorted((a for a in ref["aligner_arrays"] if a["file"] == "long"), key=lambda a: a["chunk"])
    assert len(entries) == len(chunks) and chunks[-1].length < chunks[0].length
    for chunk, entry in zip(chunks, entries):
        ours = model.engine.aligner.log_probs(samples[chunk.start : chunk.end])
        theirs = arrays[entry["array"]]
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)
        assert viterbi(ours, entry["y"]) == entry["alignment"]


def test_chunk_tokens_equal_nemos(v2):
    """Each chunk of the long file, padded to the full chunk size as NeMo pads it, decodes to NeMo's chunk tokens
    (what NeMo concatenates into its ``y_sequence``)."""
    ref, _arrays, model, root = v2
    rec = single_record(ref, "long", False)
    file = next(f for f in ref["files"] if f["name"] == "long")
    samples = load_audio(str(root / file["file"]))
    request = model.prepare(**_options(rec))
    engine = model.engine
    chunks = plan_chunks(len(samples))
    encoded = engine.encode([samples[c.start : c.end] for c in chunks], pad_to=max(c.size for c in chunks))
    assert [int(n) for n in np.array(encoded.lengths)] == rec["chunk_enc_len"]
    assert engine.decode(encoded, request.prompt, request.decoding) == rec["chunk_tokens"]


@pytest.mark.parametrize("timestamps", [False, True])
def test_batched_files_equal_nemos_single_file_results(v2, timestamps):
    """Several files in one batch (NeMo's chunking is off then): we give every file what NeMo gives it
    alone. NeMo's own batched results differ: its token budget follows the batch's padded length, so the 0.6 s clip
    runs on to the cap, and with timestamps it then returns none for that clip (the text outgrew its frames)."""
    ref, _arrays, model, root = v2
    batch = next(b for b in ref["batched"] if b["timestamps"] == timestamps)
    paths = [str(root / next(f for f in ref["files"] if f["name"] == n)["file"]) for n in batch["files"]]
    results = model.transcribe(paths, batch_size=batch["batch_size"], timestamps=timestamps,
                               **_options(batch))
    nemo_differs = []
    for name, ours, theirs in zip(batch["files"], results, batch["results"]):
        alone = single_record(ref, name, timestamps)
        assert ours.tokens == alone["tokens"], name
        if timestamps:
            assert ours.words == _nemo_entries(alone["timestamp"]["word"], "word"), name
            assert ours.segments == _nemo_entries(alone["timestamp"]["segment"], "segment"), name
        if theirs["tokens"] != alone["tokens"]:
            nemo_differs.append(name)
    assert "en_short" in nemo_differs
    if timestamps:
        short = next(r for r in batch["results"] if r["file"] == "en_short")
        assert not (short["timestamp"] or {}).get("word")
