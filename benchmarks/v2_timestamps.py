"""The cost of canary-1b-v2's timestamps (its CTC aligner pass + forced alignment), NeMo beside mlx-canary.

canary-1b-v2 times its transcripts by running a second model, a CTC FastConformer, over the same audio and
force-aligning the text (Viterbi). This measures that extra work at the aligner's real dimensions, random weights:

  aligner  24 x 1024 FastConformer (8 heads, FF 4096, conv kernel 9 + batch norm, dw_striding x8, 256 ch, 128 mels
           per-feature, no biases, no xscaling) + ConvASRDecoder over a SentencePiece vocabulary + blank
           (the real one has 16384 pieces; here 1024, trained on generated text: the head is ~3 % of the work)

Each engine runs in its own process, one thread (``--threads``), timed by process CPU time (the machine is shared);
per clip: the aligner pass (NeMo: the CTC model's ``transcribe`` as ``get_batch_variables`` calls it; mlx-canary:
``Aligner.log_probs``) and the alignment (NeMo: the rest of ``get_forced_aligned_timestamps_with_external_model``,
i.e. Viterbi on its device + timestamps; mlx-canary: ``forced_alignment.align_text``), and whether the word times
are equal. The transcription itself (the AED at canary-1b-flash dimensions, 32 x 1024 encoder) costs, on this
machine and per the speed tables in benchmarks/README.md, about 400 ms of one core per audio second in the encoder
plus ~18 ms per token with 4 decoder layers (v2 has 8: ~36 ms), so ~0.52 s per audio second (mlx-canary; NeMo
~1.75x that): ``--asr-per-audio-s`` sets the figure the table compares with (an estimate, not measured here).

  python benchmarks/v2_timestamps.py [--cache benchmarks/.cache/v2_aligner] [--seconds 10,40] [--json out.json]

Needs NeMo (build, NeMo run) and mlx-canary. Prints a table and writes JSON; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_CACHE = HERE / ".cache" / "v2_aligner"
SAMPLE_RATE = 16000
WORDS = ("the quick brown fox jumps over a lazy dog while seven bright stars shine on quiet hills and "
         "small rivers run past old stone bridges toward the sea where ships wait for morning light").split()


def aligner_cfg(tokenizer_dir: Path) -> dict:
    return {
        "sample_rate": SAMPLE_RATE,
        "tokenizer": {"dir": str(tokenizer_dir), "type": "bpe"},
        "preprocessor": {"_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
                         "sample_rate": SAMPLE_RATE, "normalize": "per_feature", "window_size": 0.025,
                         "window_stride": 0.01, "window": "hann", "features": 128, "n_fft": 512, "log": True,
                         "frame_splicing": 1, "dither": 1e-5, "pad_to": 0, "pad_value": 0.0},
        "encoder": {"_target_": "nemo.collections.asr.modules.ConformerEncoder", "feat_in": 128, "feat_out": -1,
                    "n_layers": 24, "d_model": 1024, "use_bias": False, "subsampling": "dw_striding",
                    "subsampling_factor": 8, "subsampling_conv_channels": 256, "causal_downsampling": False,
                    "ff_expansion_factor": 4, "self_attention_model": "rel_pos", "n_heads": 8,
                    "att_context_size": [-1, -1], "xscaling": False, "untie_biases": True, "pos_emb_max_len": 5000,
                    "conv_kernel_size": 9, "conv_norm_type": "batch_norm", "dropout": 0.0,
                    "dropout_pre_encoder": 0.0, "dropout_emb": 0.0, "dropout_att": 0.0},
        "decoder": {"_target_": "nemo.collections.asr.modules.ConvASRDecoder", "feat_in": 1024, "num_classes": -1,
                    "vocabulary": []},
        "decoding": {"strategy": "greedy_batch"},
        "train_ds": None, "validation_ds": None, "test_ds": None, "optim": None,
    }


def clip(seconds: float, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    tone = 0.3 * np.sin(2 * np.pi * (150 + 40 * seed) * t * (1 + 0.2 * np.sin(2 * np.pi * 0.7 * t)))
    return (tone + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def text_for(seconds: float) -> str:
    n = max(1, int(seconds * 2.5))  # ~2.5 words per second, sentences of 8 words
    words = [WORDS[i % len(WORDS)] for i in range(n)]
    return " ".join(w + ("." if (i + 1) % 8 == 0 else "") for i, w in enumerate(words)).capitalize()


def build(cache: Path) -> None:
    import torch
    from omegaconf import OmegaConf

    import sentencepiece as spm
    from nemo.collections.asr.models import EncDecCTCModelBPE
    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import create_spt_model

    cache.mkdir(parents=True, exist_ok=True)
    work = cache / "work"
    (work / "tok").mkdir(parents=True, exist_ok=True)
    rng = __import__("random").Random(0)
    lines = [" ".join(rng.choice(WORDS) + rng.choice(["", "s", "ed", "ing", "er"]) for _ in range(12))
             for _ in range(20000)]
    (work / "text.txt").write_text("\n".join(lines) + "\n")
    spm.set_random_generator_seed(1)
    create_spt_model(str(work / "text.txt"), vocab_size=1024, sample_size=-1, do_lower_case=False,
                     tokenizer_type="bpe", output_dir=str(work / "tok"))
    torch.manual_seed(0)
    model = EncDecCTCModelBPE(cfg=OmegaConf.create(aligner_cfg(work / "tok")))
    with torch.no_grad():
        head = model.decoder.decoder_layers[0]
        head.weight.mul_(8.0 / float(head.weight.std()) / 32)  # peaked log-probs: no near-tied paths
    model.eval()
    model.save_to(str(cache / "aligner.nemo"))


def run_nemo(cache: Path, seconds: list) -> dict:
    import torch

    from nemo.collections.asr.models import ASRModel
    from nemo.collections.asr.parts.utils.rnnt_utils import Hypothesis
    from nemo.collections.asr.parts.utils.timestamp_utils import get_forced_aligned_timestamps_with_external_model

    model = ASRModel.restore_from(str(cache / "aligner.nemo"), map_location="cpu")
    model.eval()
    rows = []
    for i, s in enumerate(seconds):
        audio = torch.from_numpy(clip(s, i))
        with torch.no_grad():
            model.transcribe([audio], batch_size=1, verbose=False)  # warm-up
            t0 = time.process_time()
            log_probs = model.transcribe([audio], batch_size=1, return_hypotheses=True, verbose=False)
            t1 = time.process_time()
            # The same function NeMo's transcribe() calls, given the aligner's hypotheses (its pass done above).
            hyp = get_forced_aligned_timestamps_with_external_model(
                audio=log_probs, external_ctc_model=model, batch_size=1, viterbi_device=torch.device("cpu"),
                main_model_predictions=[Hypothesis(score=0.0, y_sequence=[], text=text_for(s))],
                timestamp_type=["word", "segment"], has_hypotheses=True, verbose=False)[0]
            t2 = time.process_time()
        rows.append({"seconds": s, "aligner_s": t1 - t0, "alignment_s": t2 - t1,
                     "words": [(w["word"], w["start"], w["end"]) for w in hyp.timestamp["word"]]})
    return {"rows": rows}


def run_mlx(cache: Path, seconds: list) -> dict:
    import mlx_canary  # noqa: F401  (first: it picks MLX's CPU BLAS before mlx.core is imported)
    import mlx.core as mx
    import sentencepiece

    from mlx_canary.aligner import Aligner, CTCAligner
    from mlx_canary.convert import read_aligner, to_stored_dtype
    from mlx_canary.forced_alignment import SentencePieceVocab, align_text
    from mlx_canary.nemo_archive import NemoArchive

    with NemoArchive(cache / "aligner.nemo") as archive:
        converted = read_aligner(archive, "model_config.yaml", "model_weights.ckpt")
    net = CTCAligner(converted.config)
    net.load_weights(list(to_stored_dtype(converted.weights, "float32").items()), strict=True)
    mx.eval(net.parameters())
    net.eval()
    vocab = SentencePieceVocab(sentencepiece.SentencePieceProcessor(model_proto=converted.tokenizer))
    aligner = Aligner(net, vocab, converted.config)
    rows = []
    for i, s in enumerate(seconds):
        wave = clip(s, i)
        aligner.log_probs(wave)  # warm-up
        t0 = time.process_time()
        log_probs = aligner.log_probs(wave)
        t1 = time.process_time()
        aligned = align_text(log_probs, text_for(s), vocab, aligner.frame_seconds)
        t2 = time.process_time()
        rows.append({"seconds": s, "aligner_s": t1 - t0, "alignment_s": t2 - t1,
                     "words": [(w["text"], w["start"], w["end"]) for w in aligned.words]})
    return {"rows": rows}


def in_process(step: str, args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               OPENBLAS_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO))
    cmd = [sys.executable, __file__, "--step", step, "--cache", str(args.cache), "--seconds", args.seconds,
           "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{step} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]) if step != "build" else {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--seconds", default="10,40", help="clip lengths, comma-separated")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--asr-per-audio-s", type=float, default=0.40 + 3.25 * 0.036,
                    help="mlx-canary's transcription cost per audio second of one core (README's split at "
                         "canary-1b-flash dimensions: encoder 0.40 s; v2's 8 decoder layers at twice the 4-layer "
                         "18 ms per token, ~3.25 tokens per second of speech)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--step", choices=["build", "nemo", "mlx"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    seconds = [float(s) for s in args.seconds.split(",")]
    if args.step:
        if args.step in ("build", "nemo"):
            import torch

            torch.set_num_threads(args.threads)
            # Random weights leave subnormal floats, which x86 computes ~100x slower (as the other benchmarks and
            # oracles do, flushed to zero: below 1.2e-38 only).
            torch.set_flush_denormal(True)
        if args.step == "build":
            build(args.cache)
            return 0
        result = (run_nemo if args.step == "nemo" else run_mlx)(args.cache, seconds)
        print(json.dumps(result))
        return 0
    if not (args.cache / "aligner.nemo").is_file():
        print("building the aligner (random weights, real dimensions) ...", file=sys.stderr)
        in_process("build", args)
    nemo_file = args.cache / f"nemo-{args.seconds}-{args.threads}.json"  # NeMo's figures kept: they take long
    if nemo_file.is_file():
        nemo = json.loads(nemo_file.read_text())
    else:
        nemo = in_process("nemo", args)
        nemo_file.write_text(json.dumps(nemo))
    mlx = in_process("mlx", args)
    print(f"| audio s | NeMo aligner pass | NeMo Viterbi + times | mlx-canary aligner pass | mlx-canary Viterbi + "
          f"times | NeMo / mlx (total) | mlx total / transcription (~{args.asr_per_audio_s:.2f} s per audio s) "
          f"| words equal |")
    print("|---|---|---|---|---|---|---|---|")
    for n, m in zip(nemo["rows"], mlx["rows"]):
        total_n, total_m = n["aligner_s"] + n["alignment_s"], m["aligner_s"] + m["alignment_s"]
        print(f"| {n['seconds']:.0f} | {n['aligner_s']:.2f} | {n['alignment_s']:.3f} | {m['aligner_s']:.2f} | "
              f"{m['alignment_s']:.3f} | {total_n / total_m:.2f} | "
              f"{100 * total_m / (args.asr_per_audio_s * n['seconds']):.0f} % | "
              f"{n['words'] == m['words']} ({len(m['words'])} words) |")
    if args.json:
        args.json.write_text(json.dumps({"nemo": nemo, "mlx": mlx, "threads": args.threads}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
