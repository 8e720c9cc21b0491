"""NeMo's own long-audio answer for an oracle model (run with an interpreter that has NeMo).

    python tests/nemo_long_oracle.py --oracle tests/.cache/oracle

Builds a recording of about 100 s from the oracle's speech clips, cuts it with NeMo's canary-1b-v2 chunk
planner (``PromptedAudioToTextLhotseDataset._chunk_waveform``), decodes all chunks as one batch with NeMo's
transcribe(), and merges the chunk tokens with NeMo's ``merge_parallel_chunks``. Also records what NeMo's own
``transcribe()`` returns for the whole file (NeMo loading it itself): for a model without a timestamps ASR model it
decodes the file in one pass (``single_pass``). Written to ``<oracle>/long/long_reference.json`` next to
``long.wav``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import types
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import nemo_oracle  # noqa: E402

VARIANT = "agg_canary2_proj"
TARGET_SECONDS = 100.0
GAP_SECONDS = 0.3
OUTPUT = "long_reference.json"


def key(oracle: Path) -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update((oracle / "oracle.json").read_bytes())
    h.update((oracle / VARIANT / "reference.json").read_bytes())
    return h.hexdigest()[:16]


def is_fresh(oracle: Path) -> bool:
    try:
        return json.loads((oracle / "long" / OUTPUT).read_text())["key"] == key(oracle)
    except (OSError, ValueError, KeyError):
        return False


def long_recording(oracle: Path) -> np.ndarray:
    manifest = json.loads((oracle / "audio" / "audio.json").read_text())
    clips = [np.load(oracle / "audio" / c["waveform_file"]) for c in manifest["clips"] if c["kind"] == "mono16k"]
    gap = np.zeros(int(GAP_SECONDS * 16000), np.float32)
    parts, total, i = [], 0, 0
    while total < TARGET_SECONDS * 16000:
        parts += [clips[i % len(clips)], gap]
        total += len(clips[i % len(clips)]) + len(gap)
        i += 1
    return np.concatenate(parts).astype(np.float32)


def build(oracle: Path) -> None:
    import soundfile as sf
    import torch
    from nemo.collections.asr.data.audio_to_text_lhotse_prompted import PromptedAudioToTextLhotseDataset as D
    from nemo.collections.asr.models import EncDecMultiTaskModel
    from nemo.collections.asr.parts.utils import chunking_utils
    from nemo.collections.asr.parts.utils.rnnt_utils import Hypothesis

    out = oracle / "long"
    out.mkdir(exist_ok=True)
    wave = long_recording(oracle)
    sf.write(out / "long.wav", wave, 16000, subtype="FLOAT")

    stand_in = types.SimpleNamespace()
    stand_in._find_optimal_chunk_size = lambda total, **kw: D._find_optimal_chunk_size(stand_in, total, **kw)
    chunks, lengths = D._chunk_waveform(stand_in, torch.from_numpy(wave), chunk_size=None)
    step_starts = []
    paths = []
    for i, (chunk, n) in enumerate(zip(chunks, lengths)):
        path = out / f"chunk{i:02d}.wav"
        sf.write(path, chunk[: int(n)].numpy(), 16000, subtype="FLOAT")
        paths.append(path)
        step_starts.append(int(n))

    nemo_oracle.reset_restore_state()
    model = EncDecMultiTaskModel.restore_from(str(oracle / VARIANT / "model.nemo"), map_location="cpu")
    model.eval()
    hyps, batches = nemo_oracle._transcribe(model, paths, len(paths), dict(source_lang="en", target_lang="en", pnc="yes"))
    assert len(batches) == 1 and batches[0]["audio"].shape[1] == max(int(c.shape[0]) for c in chunks)
    chunk_tokens = [[int(t) for t in h.y_sequence.tolist()] for h in hyps]
    decoding = types.SimpleNamespace(decode_tokens_to_str=lambda ids: " ".join(str(int(i)) for i in ids))
    fresh = [Hypothesis(score=0.0, y_sequence=torch.tensor(c, dtype=torch.long)) for c in chunk_tokens]
    merged = chunking_utils.merge_parallel_chunks(
        fresh, torch.tensor(batches[0]["enc_len"]), None, False, 8, 0.01, decoding
    )
    merged_ids = [int(t) for t in merged.text.split()]
    whole, whole_batches = nemo_oracle._transcribe(model, [out / "long.wav"], 1,
                                                   dict(source_lang="en", target_lang="en", pnc="yes"))
    data = {
        "key": key(oracle),
        "variant": VARIANT,
        "seconds": len(wave) / 16000,
        "chunk_lengths": [int(n) for n in lengths],
        "chunk_size": int(chunks[0].shape[0]),
        "chunk_tokens": chunk_tokens,
        "merged_ids": merged_ids,
        "text": model.tokenizer.ids_to_text(merged_ids),
        "single_pass": {
            "tokens": [int(t) for t in whole[0].y_sequence.tolist()],
            "batches": len(whole_batches),
            "audio_samples": [int(n) for b in whole_batches for n in b["audio_lens"].reshape(-1)],
        },
    }
    (out / OUTPUT).write_text(json.dumps(data))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--oracle", type=Path, default=nemo_oracle.oracle_dir_default())
    args = ap.parse_args(argv)
    nemo_oracle.quiet_nemo()
    nemo_oracle.setup_torch()
    if not is_fresh(args.oracle):
        build(args.oracle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
