"""The cost of canary-1b-v2's timestamps next to its transcription, NeMo beside mlx-canary, at v2's dimensions.

canary-1b-v2 times its transcripts by running a second model, a CTC FastConformer, over the same audio and
force-aligning the text (Viterbi). This builds, with NeMo's own classes and random weights, a canary-1b-v2-shaped
``.nemo`` with that aligner packed in it the way the real archive carries it
(``timestamps_asr_model_config.yaml`` + ``timestamps_asr_model_weights.ckpt`` + the tokenizer artifacts):

  AED      encoder 32 x 1024 (as canary-1b-flash: 8 heads, FF 4096, conv kernel 9 + batch norm, dw_striding x8,
           256 ch, 128 mels, xscaling false), decoder 8 x 1024 (8 heads, inner 4096), canary2 prompt, one
           SentencePiece vocabulary with the special tokens (the real one has 16384 pieces; here as close as BPE
           trained on the benchmarks' generated 4-language text gets, see build.json), EOS unreachable and the
           decoder's max_sequence_length 140, so every 30 s transcript is the same ~130 tokens in both engines
           (~4 per second, speech-like; the real model's 1024 positions change nothing per token)
  aligner  24 x 1024 FastConformer (same layers, no biases, no xscaling) + ConvASRDecoder over the AED's
           SentencePiece vocabulary + blank, head scaled for peaked log-probs

Each engine runs in its own process, one thread (``--threads``), timed by process CPU time (the machine is shared).
Per clip (a WAV file each engine reads itself), the whole ``transcribe()`` without timestamps, with timestamps
(NeMo: ``timestamps=True``, its aligner + ``get_forced_aligned_timestamps_with_external_model``; mlx-canary: the
same through its aligner), and the difference; tokens and word times compared. Then the timestamps' own parts on
the same aligner: the aligner pass (NeMo: the CTC model's ``transcribe`` as ``get_batch_variables`` calls it;
mlx-canary: ``Aligner.log_probs``) and the alignment (NeMo: the rest of
``get_forced_aligned_timestamps_with_external_model``, i.e. Viterbi + timestamps; mlx-canary:
``forced_alignment.align_text``).

  python benchmarks/v2_timestamps.py [--cache benchmarks/.cache/v2_1b] [--seconds 30] [--json out.json]

Needs NeMo (build, NeMo run) and mlx-canary; the archive is ~6 GB, the conversion as much again. Prints tables and
writes JSON; asserts nothing about time.
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
DEFAULT_CACHE = HERE / ".cache" / "v2_1b"
sys.path.insert(0, str(HERE))
import nemo_models  # noqa: E402  (the benchmark models' text, tokenizer recipe, config and weight shaping)

TARGET_VOCAB = 16384  # canary-1b-v2's SentencePiece pieces
SPEC = dict(nemo_models.COMMON, name="canary-1b-v2 (random weights)", enc_d=1024, enc_layers=32, xscaling=False,
            dec_layers=8, max_seq=140, seed=2000)
CANARY2_SPECIALS = nemo_models.CANARY2_TASK_TOKENS + nemo_models.LANGS + ["spltoken0", "spltoken1"]
PROMPT = dict(source_lang="en", target_lang="en", pnc="yes")
SAMPLE_RATE = 16000


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


def train_tokenizer(work: Path) -> tuple[Path, int]:
    """One SentencePiece BPE model with canary2's special tokens as user-defined symbols (canary-1b-v2's layout),
    trained on the benchmarks' generated en/de/es/fr text: TARGET_VOCAB pieces, or as many as that text allows."""
    import re

    import sentencepiece as spm
    from nemo.collections.common.tokenizers.canary_tokenizer import DEFAULT_TOKENS
    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import create_spt_model

    out = work / "tok_spe"
    out.mkdir(parents=True, exist_ok=True)
    data = out / "train_text.txt"
    data.write_text("\n".join(line for lang in nemo_models.LANGS for line in nemo_models.generate_text(lang))
                    + "\n", encoding="utf-8")
    specials = list(DEFAULT_TOKENS) + [f"<|{t}|>" for t in CANARY2_SPECIALS]
    vocab = TARGET_VOCAB
    for _ in range(3):
        spm.set_random_generator_seed(1)
        try:
            create_spt_model(str(data), vocab_size=vocab, sample_size=-1, do_lower_case=False, tokenizer_type="bpe",
                             output_dir=str(out), user_defined_symbols=specials)
            return out, vocab
        except RuntimeError as e:  # "Vocabulary size too high (16384). Please set it to a value <= N."
            found = re.search(r"<= (\d+)", str(e))
            if not found:
                raise
            vocab = int(found.group(1))
    raise RuntimeError("could not train the tokenizer")


def shape_specials(model) -> None:
    """Special tokens never generated (they are not words): the text stays alignable."""
    import torch

    tok = model.tokenizer
    bias = model.log_softmax.mlp.layer0.bias
    with torch.no_grad():
        for i in range(tok.vocab_size):
            piece = tok.ids_to_tokens([i])[0]
            if piece.startswith("<") and piece.endswith(">"):
                bias[i] = -60.0


def pack(aed_nemo: Path, aligner_nemo: Path, out_nemo: Path) -> list[str]:
    """The AED archive plus the aligner's config and weights under the names NeMo looks for, and its tokenizer
    artifacts (streamed: the archives are GBs)."""
    import tarfile

    renamed = {"model_config.yaml": "timestamps_asr_model_config.yaml",
               "model_weights.ckpt": "timestamps_asr_model_weights.ckpt"}
    added = []
    with tarfile.open(aed_nemo, "r:*") as main, tarfile.open(out_nemo, "w:") as out:
        names = set()
        for member in main.getmembers():
            out.addfile(member, main.extractfile(member) if member.isfile() else None)
            names.add(member.name.lstrip("./"))
        with tarfile.open(aligner_nemo, "r:*") as aligner:
            for member in aligner.getmembers():
                name = member.name.lstrip("./")
                if not member.isfile() or (name in names and name not in renamed):
                    continue  # shared tokenizer artifacts: the AED's copy
                member.name = "./" + renamed.get(name, name)
                out.addfile(member, aligner.extractfile(member))
                added.append(member.name)
    return added


def build(cache: Path) -> None:
    import shutil

    import torch
    from omegaconf import OmegaConf

    from nemo.collections.asr.models import EncDecCTCModelBPE, EncDecMultiTaskModel

    cache.mkdir(parents=True, exist_ok=True)
    work = cache / "work"
    work.mkdir(exist_ok=True)
    t0 = time.time()
    tok_dir, vocab = train_tokenizer(work)
    tok_cfg = {"dir": str(tok_dir), "type": "bpe",
               "custom_tokenizer": {"_target_": "nemo.collections.common.tokenizers.canary_tokenizer."
                                               "CanaryBPETokenizer"}}
    torch.manual_seed(SPEC["seed"])
    aed = EncDecMultiTaskModel(cfg=OmegaConf.create(nemo_models.model_cfg(SPEC, tok_cfg)))
    aed.eval()
    nemo_models.shape_weights(aed, SPEC["seed"] + 7)
    shape_specials(aed)
    info = {"vocab_size": int(aed.tokenizer.vocab_size), "tokenizer_pieces": vocab,
            "aed_parameters": int(sum(p.numel() for p in aed.parameters()))}
    aed.save_to(str(work / "aed.nemo"))
    del aed
    torch.manual_seed(0)
    aligner = EncDecCTCModelBPE(cfg=OmegaConf.create(aligner_cfg(tok_dir)))
    with torch.no_grad():
        head = aligner.decoder.decoder_layers[0]
        head.weight.mul_(8.0 / float(head.weight.std()) / 32)  # peaked log-probs: no near-tied paths
    aligner.eval()
    info["aligner_parameters"] = int(sum(p.numel() for p in aligner.parameters()))
    info["aligner_classes"] = int(aligner.decoder.num_classes_with_blank)
    aligner.save_to(str(work / "aligner.nemo"))
    del aligner
    info["members_added"] = pack(work / "aed.nemo", work / "aligner.nemo", cache / "model.nemo")
    info["build_s"] = round(time.time() - t0, 1)
    info["nemo_size_bytes"] = (cache / "model.nemo").stat().st_size
    shutil.rmtree(work)
    (cache / "build.json").write_text(json.dumps(info, indent=1))


def convert(cache: Path) -> None:
    from mlx_canary.convert import convert as convert_nemo

    convert_nemo(cache / "model.nemo", cache / "mlx-float32", dtype="float32", overwrite=True,
                 progress=lambda s: None)


def clip_file(cache: Path, seconds: float, seed: int) -> Path:
    import soundfile

    path = cache / "audio" / f"clip{seconds:g}-{seed}.wav"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(str(path), clip(seconds, seed), SAMPLE_RATE, subtype="FLOAT")
    return path


def _words_nemo(hyp) -> list:
    return [(w["word"], w["start"], w["end"]) for w in (hyp.timestamp or {}).get("word", [])]


def run_nemo(cache: Path, seconds: list) -> dict:
    import torch

    from nemo.collections.asr.models import EncDecMultiTaskModel
    from nemo.collections.asr.parts.utils.rnnt_utils import Hypothesis
    from nemo.collections.asr.parts.utils.timestamp_utils import get_forced_aligned_timestamps_with_external_model

    model = EncDecMultiTaskModel.restore_from(str(cache / "model.nemo"), map_location="cpu")
    model.eval()
    ctc = model.timestamps_asr_model
    warm = str(clip_file(cache, 3, 99))

    def transcribe(path, timestamps):
        return model.transcribe([path], batch_size=1, timestamps=timestamps, return_hypotheses=True, verbose=False,
                                **PROMPT)[0]

    rows = []
    with torch.no_grad():
        transcribe(warm, False)
        transcribe(warm, True)
        for i, s in enumerate(seconds):
            path = str(clip_file(cache, s, i))
            t0 = time.process_time()
            plain = transcribe(path, False)
            t1 = time.process_time()
            timed = transcribe(path, True)
            t2 = time.process_time()
            audio = torch.from_numpy(clip(s, i))
            log_probs = ctc.transcribe([audio], batch_size=1, return_hypotheses=True, verbose=False)
            t3 = time.process_time()
            # The function NeMo's transcribe() calls, given the aligner's hypotheses (its pass done above).
            aligned = get_forced_aligned_timestamps_with_external_model(
                audio=log_probs, external_ctc_model=ctc, batch_size=1, viterbi_device=torch.device("cpu"),
                main_model_predictions=[Hypothesis(score=0.0, y_sequence=[], text=timed.text)],
                timestamp_type=["word", "segment"], has_hypotheses=True, verbose=False)[0]
            t4 = time.process_time()
            rows.append({"seconds": s, "plain_s": t1 - t0, "timed_s": t2 - t1, "aligner_s": t3 - t2,
                         "alignment_s": t4 - t3, "tokens": [int(t) for t in plain.y_sequence],
                         "timed_tokens": [int(t) for t in timed.y_sequence], "text": timed.text,
                         "words": _words_nemo(timed), "aligned_words": _words_nemo(aligned)})
    return {"rows": rows}


def run_mlx(cache: Path, seconds: list) -> dict:
    import mlx_canary

    from mlx_canary.forced_alignment import align_text

    model = mlx_canary.load_model(cache / "mlx-float32")
    aligner = model.engine.aligner
    warm = clip_file(cache, 3, 99)
    model.transcribe(warm, timestamps=False, **PROMPT)
    model.transcribe(warm, timestamps=True, **PROMPT)
    rows = []
    for i, s in enumerate(seconds):
        path = clip_file(cache, s, i)
        t0 = time.process_time()
        plain = model.transcribe(path, timestamps=False, **PROMPT)
        t1 = time.process_time()
        timed = model.transcribe(path, timestamps=True, **PROMPT)
        t2 = time.process_time()
        log_probs = aligner.log_probs(clip(s, i))
        t3 = time.process_time()
        aligned = align_text(log_probs, timed.text, aligner.vocab, aligner.frame_seconds)
        t4 = time.process_time()
        rows.append({"seconds": s, "plain_s": t1 - t0, "timed_s": t2 - t1, "aligner_s": t3 - t2,
                     "alignment_s": t4 - t3, "tokens": list(plain.tokens), "timed_tokens": list(timed.tokens),
                     "text": timed.text, "words": [(w["text"], w["start"], w["end"]) for w in timed.words],
                     "aligned_words": [(w["text"], w["start"], w["end"]) for w in aligned.words]})
    return {"rows": rows}


def in_process(step: str, args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               OPENBLAS_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO))
    cmd = [sys.executable, __file__, "--step", step, "--cache", str(args.cache), "--seconds", args.seconds,
           "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{step} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]) if step in ("nemo", "mlx") else {}


def report(nemo: dict, mlx: dict) -> None:
    print("| audio s | engine | transcribe | with timestamps | difference | of which aligner pass | Viterbi + times "
          "| tokens | equal to NeMo |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, m in zip(nemo["rows"], mlx["rows"]):
        for engine, r in (("NeMo", n), ("mlx-canary", m)):
            same = "—" if r is n else (f"tokens {m['tokens'] == n['tokens'] and m['timed_tokens'] == n['timed_tokens']}"
                                      f", words {m['words'] == n['words']} ({len(m['words'])})")
            print(f"| {r['seconds']:.0f} | {engine} | {r['plain_s']:.2f} | {r['timed_s']:.2f} | "
                  f"{r['timed_s'] - r['plain_s']:+.2f} ({100 * (r['timed_s'] / r['plain_s'] - 1):+.0f} %) | "
                  f"{r['aligner_s']:.2f} | {r['alignment_s']:.3f} | {len(r['tokens'])} | {same} |")
        print(f"|   | NeMo / mlx-canary | {n['plain_s'] / m['plain_s']:.2f} | {n['timed_s'] / m['timed_s']:.2f} | "
              f"| {n['aligner_s'] / m['aligner_s']:.2f} | | | aligned words equal: "
              f"{n['aligned_words'] == m['aligned_words']} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--seconds", default="30", help="clip lengths, comma-separated")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--step", choices=["build", "convert", "nemo", "mlx"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    seconds = [float(s) for s in args.seconds.split(",")]
    if args.step:
        if args.step in ("build", "nemo"):
            import torch

            torch.set_num_threads(args.threads)
            # Random weights leave subnormal floats, which x86 computes ~100x slower (as the other benchmarks and
            # oracles do, flushed to zero: below 1.2e-38 only).
            torch.set_flush_denormal(True)
        if args.step in ("build", "convert"):
            (build if args.step == "build" else convert)(args.cache)
            return 0
        result = (run_nemo if args.step == "nemo" else run_mlx)(args.cache, seconds)
        print(json.dumps(result))
        return 0
    if not (args.cache / "build.json").is_file():
        print("building canary-1b-v2 with its aligner (random weights, real dimensions) ...", file=sys.stderr)
        in_process("build", args)
    if not (args.cache / "mlx-float32" / "config.json").is_file():
        print("converting ...", file=sys.stderr)
        in_process("convert", args)
    nemo_file = args.cache / f"nemo-{args.seconds}-{args.threads}.json"  # NeMo's figures kept: they take long
    if nemo_file.is_file():
        nemo = json.loads(nemo_file.read_text())
    else:
        nemo = in_process("nemo", args)
        nemo_file.write_text(json.dumps(nemo))
    mlx = in_process("mlx", args)
    print(f"load average {os.getloadavg()[0]:.1f}; {json.loads((args.cache / 'build.json').read_text())}")
    report(nemo, mlx)
    if args.json:
        args.json.write_text(json.dumps({"nemo": nemo, "mlx": mlx, "threads": args.threads}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
