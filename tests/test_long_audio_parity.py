"""Long audio: our end-to-end chunked path equals NeMo's chunk-by-chunk decoding merged by NeMo's function.

The reference (tests/nemo_long_oracle.py) is a ~100 s recording cut with NeMo's chunk planner, all chunks
decoded as one batch by NeMo's transcribe(), and merged with NeMo's ``merge_parallel_chunks``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_canary.audio import load_audio
from mlx_canary.chunking import plan_chunks
from mlx_canary.convert import convert
from mlx_canary.loading import load_model

pytestmark = pytest.mark.parity

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def long_reference(oracle_dir):
    import nemo_long_oracle

    if not nemo_long_oracle.is_fresh(oracle_dir):
        run = subprocess.run([sys.executable, str(HERE / "nemo_long_oracle.py"), "--oracle", str(oracle_dir)],
                             capture_output=True, text=True)
        if run.returncode != 0:
            pytest.fail(f"building NeMo's long-audio reference failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    ref = json.loads((oracle_dir / "long" / nemo_long_oracle.OUTPUT).read_text())
    return oracle_dir / "long" / "long.wav", ref


def test_long_recording_equals_nemo_chunks_merged_by_nemo(long_reference, oracle_dir, tmp_path):
    wav, ref = long_reference
    assert ref["seconds"] >= 95
    out = tmp_path / "mlx"
    convert(str(oracle_dir / ref["variant"] / "model.nemo"), out, progress=lambda _line: None)
    model = load_model(out)

    chunks = plan_chunks(int(round(ref["seconds"] * 16000)))
    assert [c.length for c in chunks] == ref["chunk_lengths"]
    assert max(c.size for c in chunks) == ref["chunk_size"]

    result = model.transcribe(str(wav), source_lang="en", target_lang="en", pnc=True, batch_size=4)
    assert result.tokens == ref["merged_ids"]
    assert result.duration == pytest.approx(ref["seconds"])


def test_no_chunking_equals_nemos_single_pass_from_the_file(long_reference, oracle_dir, tmp_path):
    """``chunk_seconds=0`` (``--chunk-length 0``): the whole >90 s file in one pass, as NeMo's ``transcribe()`` decodes
    it for a model without a timestamps ASR model (NeMo loading the file itself)."""
    wav, ref = long_reference
    single = ref["single_pass"]
    assert single["batches"] == 1 and single["audio_samples"] == [int(round(ref["seconds"] * 16000))]  # one pass
    out = tmp_path / "mlx"
    convert(str(oracle_dir / ref["variant"] / "model.nemo"), out, progress=lambda _line: None)
    model = load_model(out)
    samples = load_audio(str(wav))
    assert model.needs_chunking(samples) and not model.needs_chunking(samples, chunk_seconds=0)
    result = model.transcribe(str(wav), source_lang="en", target_lang="en", pnc=True, chunk_seconds=0)
    assert result.tokens == single["tokens"]
