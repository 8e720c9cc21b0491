"""Streaming accuracy on real (synthesized) speech: the bundled demo model's held-out clips, offline WER next to
streaming WER for both policies and a few window settings, plus the long held-out recording (3+ minutes of
continuous speech) where the decoder prefix matters (NeMo issue #15231, ``history="window"``).

    python benchmarks/streaming_accuracy.py [--json out.json]

Needs espeak-ng (the held-out clips are rebuilt with the training script's word bank, as tests/test_demo_model.py
does). Prints a table; asserts nothing. WER is jiwer's if installed, else a word-level edit distance.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import mlx_canary  # noqa: E402
from mlx_canary.streaming_policy import StreamingOptions  # noqa: E402

DEMO = REPO / "mlx_canary" / "demo"
BANK_CACHE = REPO / "tests" / ".cache" / "demo_bank"
SETTINGS = [  # (label, options): left-chunk-right seconds
    ("waitk 10-1-0.5", StreamingOptions(policy="waitk", chunk_secs=1.0, right_context_secs=0.5)),
    ("alignatt 10-1-0.5", StreamingOptions(policy="alignatt", chunk_secs=1.0, right_context_secs=0.5)),
    ("waitk 10-2-2 (NeMo's default)", StreamingOptions()),
    ("alignatt 5-2-1", StreamingOptions(policy="alignatt", left_context_secs=5.0, chunk_secs=2.0,
                                        right_context_secs=1.0)),
    ("alignatt 4-0.5-0.5", StreamingOptions(policy="alignatt", left_context_secs=4.0, chunk_secs=0.5,
                                            right_context_secs=0.5)),
]


def load_recipe():
    spec = importlib.util.spec_from_file_location("_train_demo_model", REPO / "scripts" / "train_demo_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def wer(pairs) -> float:
    try:
        import jiwer

        return jiwer.wer([r for r, _ in pairs], [h or "<empty>" for _, h in pairs])
    except ImportError:
        errors = words = 0
        for ref, hyp in pairs:
            r, h = ref.split(), hyp.split()
            d = list(range(len(h) + 1))
            for i, rw in enumerate(r, 1):
                prev, d[0] = d[0], i
                for j, hw in enumerate(h, 1):
                    prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (rw != hw))
            errors, words = errors + d[len(h)], words + len(r)
        return errors / max(words, 1)


def normalise(text: str) -> str:
    return " ".join("".join(ch for ch in text.lower() if ch.isalnum() or ch.isspace() or ch == "'").split())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    recipe = load_recipe()
    ref = json.loads((DEMO / "nemo_reference.json").read_text())
    voices = [recipe.Voice(v["lang"], v["voice"], v["variant"], v["speed"], v["pitch"]) for v in ref["voices"].values()]
    script = (REPO / "scripts" / "train_demo_model.py").read_text()
    cache = BANK_CACHE / hashlib.sha256((recipe.espeak_version() + script).encode()).hexdigest()[:16]
    bank = recipe.build_bank(voices, cache)
    model = mlx_canary.load_model("demo")

    clips = []
    for clip in ref["clips"]:
        samples, _ = recipe.compose(clip["parts"], bank[clip["voice"]])
        clips.append((clip["lang"], normalise(clip["reference"]["nopnc"]), samples.astype(np.float32) / 32768.0))
    long = ref["long"]
    long_samples, _ = recipe.compose(long["parts"], bank[long["voice"]])
    long_wave = long_samples.astype(np.float32) / 32768.0
    long_ref = normalise(long["reference"]["nopnc"])

    rows = []

    def run(label, streaming, history="all"):
        if streaming is not None and history != "all":
            streaming = StreamingOptions(**{**streaming.__dict__, "history": history})
        started = time.perf_counter()
        short = [(r, normalise(model.transcribe(w, source_lang=lang, pnc=False, streaming=streaming).text))
                 for lang, r, w in clips]
        long_hyp = normalise(model.transcribe(long_wave, source_lang="en", pnc=False, streaming=streaming,
                                              chunk_seconds=None).text)
        row = {"setting": label + ("" if history == "all" else f", history={history}"), "clips": len(short),
               "wer_clips": wer(short), "wer_long": wer([(long_ref, long_hyp)]),
               "long_words_out": len(long_hyp.split()), "long_words_ref": len(long_ref.split()),
               "seconds": time.perf_counter() - started}
        rows.append(row)
        print(f"{row['setting']:<42} {row['wer_clips'] * 100:6.2f} % {row['wer_long'] * 100:7.2f} %"
              f"  {row['long_words_out']:4d}/{row['long_words_ref']} words  ({row['seconds']:.0f} s)", flush=True)

    print(f"{len(clips)} held-out clips ({sum(len(w) for *_, w in clips) / 16000:.0f} s), long recording "
          f"{len(long_wave) / 16000:.0f} s; WER without punctuation")
    print(f"{'setting':<42} {'clips':>8} {'long':>9}")
    run("offline (transcribe)", None)
    for label, options in SETTINGS:
        run(label, options)
    run("alignatt 10-1-0.5", SETTINGS[1][1], history="window")
    run("waitk 10-1-0.5", SETTINGS[0][1], history="window")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
