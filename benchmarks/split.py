"""Where mlx-canary's model time goes: features, encoder and decoding of each file (batch 1), in process CPU time.

    python benchmarks/split.py MODEL_DIR [files...]      # default files: speed.py's clips in benchmarks/.cache
    OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/split.py ...   # one core

Audio reading is left out (its decoder may run in a child process). Decoding is greedy_decode as transcribe()
runs it (cross-attention keys/values, the prompt pass, every cached step).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    import mlx_canary
    from mlx_canary import _blas
    import mlx.core as mx
    import numpy as np
    from mlx_canary import audio as audio_io
    from mlx_canary.decoding import greedy_decode
    from mlx_canary.options import Task, TranscribeOptions

    model = mlx_canary.load_model(argv[0])
    net = model.engine.net
    files = argv[1:] or sorted(str(p) for p in (HERE / ".cache" / "speed-audio").glob("*.wav"))
    prompts = mx.array([model.engine.prompt(Task("en", "en", True, False))], dtype=mx.int32)
    options = model.engine.decode_options(TranscribeOptions())
    waves = [audio_io.load(f) for f in files]
    for _ in range(2):  # the first round warms up; the second is reported
        spent = dict.fromkeys(("features", "encoder", "decoding"), 0.0)
        tokens = 0
        for wave in waves:
            audio, length = mx.array(wave[None].astype(np.float32)), mx.array([len(wave)], dtype=mx.int32)
            t = time.process_time()
            feats, feat_lengths = net.features(audio, length)
            mx.eval(feats, feat_lengths)
            spent["features"] += time.process_time() - t
            t = time.process_time()
            enc, enc_lengths = net.encode(feats, feat_lengths)
            mx.eval(enc, enc_lengths)
            spent["encoder"] += time.process_time() - t
            t = time.process_time()
            tokens += len(greedy_decode(net, enc, enc_lengths, prompts, options)[0])
            spent["decoding"] += time.process_time() - t
    seconds = sum(len(w) for w in waves) / 16000
    print(f"BLAS: {_blas.describe()}; {len(files)} files, {seconds:.1f} s of audio, {tokens} tokens")
    for name, s in spent.items():
        print(f"  {name:9s} {s:7.2f} s CPU" + (f"  ({s / seconds * 1e3:.0f} ms per audio second)"
                                               if name != "decoding" else f"  ({s / tokens * 1e3:.1f} ms/token)"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
