"""NeMo's references for the CTC aligner and forced alignment (run with an interpreter that has NeMo).

    python tests/nemo_aligner_oracle.py --out tests/.cache/aligner_oracle

Writes, from NeMo 3.0's own classes and functions:
- ``aligner/``: a tiny random-weight ``EncDecCTCModelBPE`` shaped like canary-1b-v2's timestamps model (FastConformer,
  dw_striding 8x, 128 mel per-feature, no biases, no xscaling, ``ConvASRDecoder`` over a SentencePiece vocabulary +
  blank), its head scaled so the log-probs are peaked: the members a v2 ``.nemo`` carries for it,
  ``timestamps_asr_model_config.yaml``, ``timestamps_asr_model_weights.ckpt`` and the tokenizer artifact it names.
- ``clips.npz``: test waveforms and, per clip, the aligner's log-probs as NeMo's ``transcribe(return_hypotheses=True)``
  gives them to the forced aligner (``hypothesis.y_sequence``).
- ``reference.json``: ``get_forced_aligned_timestamps_with_external_model`` results (words + segments, and chars as
  used before long-form merging) for (a) the clips through the aligner itself, from the audio on, and (b) random
  log-probs (``random.npz``, incl. tied and blunt ones) given as hypotheses, with texts that exercise the splitting
  rules (segments, punctuation, repeats, unknown characters, too many tokens, empty text).
The pytest process never imports NeMo: tests read these files (cached; rebuilt when this script changes).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "scripts"))

DEFAULT_OUT = HERE / ".cache" / "aligner_oracle"
SAMPLE_RATE = 16000
VOCAB = 96
DIMS = dict(d_model=32, n_layers=2, n_heads=4, channels=16, kernel=9)
HEAD_SCALE = 12.0  # logits' spread: peaked log-probs, no near-tied Viterbi paths on the clips
SEED = 19

TRAIN_TEXT = [
    "Hello world. How are you? I'm fine, thank you!",
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella at 10 a.m. and ask her to bring these things.",
    "Good morning, good evening, and good night.",
    "Where is the station? Turn left, then walk straight ahead!",
    "Yes, no, maybe. Well... we will see.",
    "aa bb cc dd ee ff ll oo ss tt",
]

# (text, clip) pairs aligned through the aligner from the audio on; texts also aligned on random log-probs.
TEXTS = [
    "Hello world. How are you?",
    "hello  world,   how are  you",
    "Good morning, good evening, and good night.",
    "Call me at 10 a.m. please! Yes.",
    "Well... we will see. Fine!",
    "aa aa ll oo ss",
    "Hello, ẞ world ⁇ end.",
    "Yes ?! No , ok .",
    "",
    "a",
]
CLIP_SECONDS = [1.0, 2.37, 4.0, 6.5]


def key() -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    try:
        import nemo

        h.update(nemo.__version__.encode())
    except ImportError:
        pass
    return h.hexdigest()[:16]


def is_fresh(out: Path) -> bool:
    try:
        return json.loads((out / "reference.json").read_text())["key"] == key()
    except (OSError, ValueError, KeyError):
        return False


def is_complete(out: Path) -> bool:
    """A reference from this script exists (NeMo's version unchecked: for environments without NeMo)."""
    try:
        return json.loads((out / "reference.json").read_text())["script"] == key_script()
    except (OSError, ValueError, KeyError):
        return False


def key_script() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def aligner_config(tokenizer_dir: Path, vocab: int) -> dict:
    d = DIMS
    return {
        "sample_rate": SAMPLE_RATE,
        "tokenizer": {"dir": str(tokenizer_dir), "type": "bpe"},
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "sample_rate": SAMPLE_RATE, "normalize": "per_feature", "window_size": 0.025, "window_stride": 0.01,
            "window": "hann", "features": 128, "n_fft": 512, "log": True, "frame_splicing": 1, "dither": 1e-5,
            "pad_to": 0, "pad_value": 0.0,
        },
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConformerEncoder",
            "feat_in": 128, "feat_out": -1, "n_layers": d["n_layers"], "d_model": d["d_model"],
            "use_bias": False, "subsampling": "dw_striding", "subsampling_factor": 8,
            "subsampling_conv_channels": d["channels"], "causal_downsampling": False, "ff_expansion_factor": 4,
            "self_attention_model": "rel_pos", "n_heads": d["n_heads"], "att_context_size": [-1, -1],
            "xscaling": False, "untie_biases": True, "pos_emb_max_len": 5000, "conv_kernel_size": d["kernel"],
            "conv_norm_type": "batch_norm", "dropout": 0.0, "dropout_pre_encoder": 0.0, "dropout_emb": 0.0,
            "dropout_att": 0.0,
        },
        "decoder": {
            "_target_": "nemo.collections.asr.modules.ConvASRDecoder",
            "feat_in": d["d_model"], "num_classes": vocab, "vocabulary": [],
        },
        "decoding": {"strategy": "greedy_batch"},
        "train_ds": None, "validation_ds": None, "test_ds": None, "optim": None,
    }


def build_aligner(work: Path):
    import torch
    from omegaconf import OmegaConf

    from nemo.collections.asr.models import EncDecCTCModelBPE
    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import create_spt_model
    import sentencepiece as spm
    from nemo_support import QuietStderr

    tok_dir = work / "tokenizer"
    tok_dir.mkdir(parents=True)
    (work / "text.txt").write_text("\n".join(TRAIN_TEXT * 4) + "\n")
    spm.set_random_generator_seed(1)
    with QuietStderr():
        create_spt_model(str(work / "text.txt"), vocab_size=VOCAB, sample_size=-1, do_lower_case=False,
                         tokenizer_type="bpe", output_dir=str(tok_dir))
    cfg = OmegaConf.create(aligner_config(tok_dir, VOCAB))
    torch.manual_seed(SEED)
    model = EncDecCTCModelBPE(cfg=cfg)
    model.eval()
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("pos_bias_u") or name.endswith("pos_bias_v"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
        head = model.decoder.decoder_layers[0]
        head.weight.mul_(HEAD_SCALE / max(float(head.weight.std()), 1e-6) / DIMS["d_model"] ** 0.5)
        head.bias.copy_(torch.randn(head.bias.shape, generator=g))
    return model


def clips() -> list:
    rng = np.random.default_rng(SEED)
    waves = []
    for i, seconds in enumerate(CLIP_SECONDS):
        n = int(seconds * SAMPLE_RATE)
        t = np.arange(n) / SAMPLE_RATE
        tone = 0.3 * np.sin(2 * np.pi * (180 + 90 * i) * t * (1 + 0.3 * np.sin(2 * np.pi * 1.3 * t)))
        envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 0.9 * t + i)
        waves.append((tone * envelope + 0.05 * rng.standard_normal(n)).astype(np.float32))
    return waves


def random_log_probs(rng, frames: int, vocab_with_blank: int, kind: str) -> np.ndarray:
    import torch

    if kind == "uniform":  # every path ties: NeMo's tie-breaking decides everything
        logits = np.zeros((frames, vocab_with_blank), np.float32)
    elif kind == "coarse":  # many exact ties
        logits = np.round(rng.standard_normal((frames, vocab_with_blank)) * 2) .astype(np.float32)
    else:
        logits = (rng.standard_normal((frames, vocab_with_blank)) * 6).astype(np.float32)
    return torch.log_softmax(torch.from_numpy(logits), dim=-1).numpy()


def nemo_timestamps(model, audio, texts: list, timestamp_type, has_hypotheses: bool) -> list:
    import torch

    from nemo.collections.asr.parts.utils.rnnt_utils import Hypothesis
    from nemo.collections.asr.parts.utils.timestamp_utils import get_forced_aligned_timestamps_with_external_model

    hyps = [Hypothesis(score=0.0, y_sequence=[], text=t) for t in texts]
    out = get_forced_aligned_timestamps_with_external_model(
        audio=audio, external_ctc_model=model, main_model_predictions=hyps, batch_size=1,
        viterbi_device=torch.device("cpu"), timestamp_type=timestamp_type, has_hypotheses=has_hypotheses,
        verbose=False,
    )
    return [h.timestamp for h in out]


def pack_members(model, work: Path, dest: Path) -> dict:
    """The aligner as a v2 archive holds it: config + weights under the timestamps names, the tokenizer artifact."""
    path = work / "aligner.nemo"
    model.save_to(str(path))
    names = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            base = member.name.split("/")[-1]
            data = tar.extractfile(member).read()
            if base == "model_config.yaml":
                base = "timestamps_asr_model_config.yaml"
            elif base == "model_weights.ckpt":
                base = "timestamps_asr_model_weights.ckpt"
            (dest / base).write_bytes(data)
            names[member.name] = base
    return names


def build(out: Path) -> None:
    import tempfile

    import torch
    from nemo_support import quiet_nemo

    quiet_nemo()
    torch.set_num_threads(1)
    if out.exists():
        shutil.rmtree(out)
    (out / "aligner").mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_aligner(work)
        members = pack_members(model, work, out / "aligner")
        waves = clips()
        with torch.no_grad():
            hyps = model.transcribe([torch.from_numpy(w) for w in waves], batch_size=1, return_hypotheses=True,
                                    verbose=False)
        log_probs = [h.y_sequence.numpy().astype(np.float32) for h in hyps]
        arrays = {f"wave{i}": w for i, w in enumerate(waves)}
        arrays.update({f"log_probs{i}": lp for i, lp in enumerate(log_probs)})
        np.savez(out / "clips.npz", **arrays)

        frame_seconds = model.cfg.preprocessor.window_stride * model.encoder.subsampling_factor
        audio_cases = []
        for i, text in enumerate(TEXTS):
            clip = i % len(waves)
            audio = [torch.from_numpy(waves[clip])]
            audio_cases.append({
                "clip": clip, "text": text,
                "words_segments": nemo_timestamps(model, audio, [text], ["word", "segment"], False)[0],
                "chars": nemo_timestamps(model, audio, [text], "char", False)[0],
            })

        rng = np.random.default_rng(SEED + 1)
        random_cases, random_arrays = [], {}
        vocab_with_blank = len(model.tokenizer.vocab) + 1
        for i, text in enumerate(TEXTS):
            for kind in ("peaked", "coarse", "uniform"):
                frames = int(rng.integers(12, 60)) if text != "a" else 1
                lp = random_log_probs(rng, frames, vocab_with_blank, kind)
                name = f"case{len(random_cases)}"
                random_arrays[name] = lp
                hyp = [_hypothesis(lp)]
                random_cases.append({
                    "array": name, "text": text, "kind": kind,
                    "words_segments": nemo_timestamps(model, hyp, [text], ["word", "segment"], True)[0],
                    "chars": nemo_timestamps(model, [_hypothesis(lp)], [text], "char", True)[0],
                })
        np.savez(out / "random.npz", **random_arrays)

    reference = {
        "key": key(), "script": key_script(), "frame_seconds": frame_seconds, "vocab_size": vocab_with_blank - 1,
        "members": members, "audio_cases": audio_cases, "random_cases": random_cases,
        "clip_frames": [int(lp.shape[0]) for lp in log_probs],
    }
    (out / "reference.json").write_text(json.dumps(reference, indent=1, default=_plain))


def _hypothesis(log_probs: np.ndarray):
    import torch

    from nemo.collections.asr.parts.utils.rnnt_utils import Hypothesis

    return Hypothesis(score=0.0, y_sequence=torch.from_numpy(log_probs.copy()), text="")


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(type(value))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if not is_fresh(args.out):
        build(args.out)
    return 0



def oracle_dir_for_tests() -> Path:
    """For pytest: the cached references, built in a subprocess with this interpreter when stale (never imported
    NeMo here); skips when NeMo is missing and no complete reference exists."""
    import importlib.util
    import os
    import subprocess

    import pytest

    out = Path(os.environ.get("MLX_CANARY_ALIGNER_ORACLE_DIR") or DEFAULT_OUT).resolve()
    if is_fresh(out) if importlib.util.find_spec("nemo") else is_complete(out):
        return out
    if importlib.util.find_spec("nemo") is None:
        pytest.skip("NeMo is not importable and no cached aligner oracle matches tests/nemo_aligner_oracle.py")
    run = subprocess.run([sys.executable, str(Path(__file__)), "--out", str(out)], capture_output=True, text=True,
                         timeout=900)
    if run.returncode != 0 or not is_fresh(out):
        pytest.fail(f"building the aligner oracle failed (rc={run.returncode}):\n{run.stderr[-4000:]}")
    return out


if __name__ == "__main__":
    sys.exit(main())
