"""NeMo's streaming answers (Wait-k, AlignAtt) for the oracle models (run with an interpreter that has NeMo).

    python tests/nemo_stream_oracle.py --oracle tests/.cache/oracle

NeMo does not install its streaming driver (``examples/asr/asr_chunked_inference/aed/
speech_to_text_aed_streaming_infer.py``); ``run_driver`` below re-implements its loop from reading it (NeMo 3.0
era, the version calling ``GreedyBatchedStreamingAEDComputer.initialize_aed_model_state`` and passing
``encoder_input_mask``), step for step and with NeMo's own pieces: the model restored from the ``.nemo`` file
with dither 0 and pad_to 0 and greedy decoding, ``return_decoder_input_ids`` for the prompt, NeMo's
``SimpleAudioDataset`` (librosa) reading the WAV files and ``AudioBatch.collate_fn`` padding them,
``ContextSize`` / ``StreamingBatchedAudioBuffer`` for the windows, the model's forward on each window, the right
context dropped from the encoder length except on a file's last chunk, ``prev_encoder_shift``, NeMo's
``GreedyBatchedStreamingAEDComputer`` for the decisions and its ``compute_*_lagging`` for LAAL. What the driver
does beyond that (manifests, WER, output files) is left out.

Written to ``<oracle>/streaming/stream_reference.json`` next to the WAV files it decoded. A case NeMo raises on
is recorded with its error instead of tokens.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import nemo_long_oracle  # noqa: E402
import nemo_oracle  # noqa: E402

OUTPUT = "stream_reference.json"
VARIANTS = ("agg_canary2_proj", "agg_canary1", "spe_canary2")
POLICIES = ("waitk", "alignatt")
# (left, chunk, right) seconds
SETTINGS = {"10-1-0.5": (10.0, 1.0, 0.5), "5-2-1": (5.0, 2.0, 1.0), "4-0.5-0.5": (4.0, 0.5, 0.5)}
PROMPT = {"source_lang": "en", "target_lang": "en", "pnc": "yes", "task": "asr"}
CLIPS = ("speech", "short", "silence", "long")
# Every other knob of AEDStreamingDecodingConfig, one at a time (variant, setting, clips below). The computer
# reads max_tokens_per_alignatt_step from its state (the driver sets it from the contexts), so that one is set
# on the state, as a driver passing the knob on would.
KNOBS = [
    ("alignatt", {"use_avgpool_for_alignatt": True}),
    ("alignatt", {"alignatt_thr": 4}),
    ("alignatt", {"exclude_sink_frames": 0}),
    ("alignatt", {"xatt_scores_layer": -1}),
    ("alignatt", {"hallucinations_detector": False}),
    ("alignatt", {"max_tokens_per_alignatt_step": 3}),
    ("alignatt", {"waitk_lagging": 1}),
    ("waitk", {"waitk_lagging": 3}),
    ("waitk", {"hallucinations_detector": False}),
    ("waitk", {"max_generation_length": 40}),
]
# Streams that run into NeMo's limits (the hallucination detector off lets random weights talk on): the state's
# 256 positions (agg_canary2_proj) and the decoder's positional table (agg_canary1: 192 positions, NeMo raises).
LIMIT_CASES = [
    ("agg_canary2_proj", "alignatt", "4-0.5-0.5", "long", {"hallucinations_detector": False}),
    ("agg_canary1", "waitk", "4-0.5-0.5", "long", {"hallucinations_detector": False}),
    ("agg_canary1", "alignatt", "10-1-0.5", "long", {"hallucinations_detector": False}),
]
# Translation (en -> de): both policies on one variant.
AST_PROMPT = {"source_lang": "en", "target_lang": "de", "pnc": "yes", "task": "ast"}
AST_VARIANTS = ("agg_canary2_proj", "agg_canary1")
KNOB_VARIANT = "agg_canary2_proj"
KNOB_SETTING = "10-1-0.5"
KNOB_CLIPS = ("speech", "short", "long")
# Files decoded together by the batched driver (different lengths), compared with their batch-1 results.
BATCH_CLIPS = ("speech", "short", "silence", "speech2")
BATCH_VARIANT = "agg_canary2_proj"
BATCH_SETTING = "10-1-0.5"


def key(oracle: Path) -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(Path(nemo_long_oracle.__file__).read_bytes())
    h.update((oracle / "oracle.json").read_bytes())
    for variant in VARIANTS:
        h.update((oracle / variant / "reference.json").read_bytes())
    return h.hexdigest()[:16]


def is_fresh(oracle: Path) -> bool:
    try:
        return json.loads((oracle / "streaming" / OUTPUT).read_text())["key"] == key(oracle)
    except (OSError, ValueError, KeyError):
        return False


def clip_waves(oracle: Path) -> dict:
    """name -> (samples, reference text). Speech from the oracle corpus; the rest derived from it."""
    manifest = json.loads((oracle / "audio" / "audio.json").read_text())
    clips = {c["name"]: c for c in manifest["clips"]}

    def wave(name):
        return np.load(oracle / "audio" / clips[name]["waveform_file"]).astype(np.float32)

    fox = wave("en_fox")
    return {
        "speech": (wave("en_stella"), clips["en_stella"]["text"]),
        "speech2": (fox, clips["en_fox"]["text"]),
        "short": (fox[8000:12800].copy(), "quick"),  # 0.3 s from the middle of a word
        # A quiet room (-80 dBFS noise), not digital zeros: on all-zero audio the per-feature normalisation
        # divides rounding residue by 1e-5, so NeMo's and any other summation order give different features.
        "silence": ((np.random.default_rng(0).standard_normal(32000) * 1e-4).astype(np.float32), ""),
        "long": (nemo_long_oracle.long_recording(oracle), ""),
    }


def write_clips(oracle: Path) -> dict:
    import soundfile as sf

    out = oracle / "streaming"
    out.mkdir(exist_ok=True)
    files = {}
    for name, (samples, text) in clip_waves(oracle).items():
        path = out / f"{name}.wav"
        sf.write(path, samples, 16000, subtype="FLOAT")
        files[name] = {"file": path.name, "text": text, "samples": int(samples.size)}
    return files


def load_model(path: Path):
    from nemo.collections.asr.models import EncDecMultiTaskModel
    from nemo.collections.asr.parts.submodules.multitask_decoding import MultiTaskDecodingConfig

    nemo_oracle.reset_restore_state()
    model = EncDecMultiTaskModel.restore_from(str(path), map_location="cpu")
    model.freeze()
    model.to(dtype=__import__("torch").float32)
    decoding = MultiTaskDecodingConfig()
    decoding.strategy = "greedy"
    model.change_decoding_strategy(decoding)
    model.preprocessor.featurizer.dither = 0.0
    model.preprocessor.featurizer.pad_to = 0
    model.eval()
    return model


def run_driver(model, paths: list[Path], texts: list[str], policy: str, setting: tuple, batch_size: int,
               knobs: dict | None = None, prompt: dict | None = None) -> dict:
    """The driver's main loop for one batch of files; returns per-file tokens, alignment, LAAL and the prompt."""
    import torch
    from nemo.collections.asr.models.aed_multitask_models import lens_to_mask
    from nemo.collections.asr.parts.submodules.aed_decoding import (
        GreedyBatchedStreamingAEDComputer,
        return_decoder_input_ids,
    )
    from nemo.collections.asr.parts.submodules.multitask_decoding import AEDStreamingDecodingConfig
    from nemo.collections.asr.parts.utils.streaming_utils import (
        AudioBatch,
        ContextSize,
        SimpleAudioDataset,
        StreamingBatchedAudioBuffer,
    )
    from omegaconf import OmegaConf

    left_secs, chunk_secs, right_secs = setting
    knobs = dict(knobs or {})
    per_step = knobs.pop("max_tokens_per_alignatt_step", None)
    decoding_cfg = OmegaConf.structured(AEDStreamingDecodingConfig(streaming_policy=policy, **knobs))
    cfg = OmegaConf.create({"prompt": dict(prompt or PROMPT), "batch_size": batch_size})

    sample_rate = model.cfg.preprocessor["sample_rate"]
    stride = model.cfg.preprocessor["window_stride"]
    features_per_sec = 1.0 / stride
    sub = model.encoder.subsampling_factor
    features_frame2audio_samples = (int(sample_rate * stride) // sub) * sub
    encoder_frame2audio_samples = features_frame2audio_samples * sub
    frames = ContextSize(
        left=int(left_secs * features_per_sec / sub),
        chunk=int(chunk_secs * features_per_sec / sub),
        right=int(right_secs * features_per_sec / sub),
    )
    samples = ContextSize(
        left=frames.left * sub * features_frame2audio_samples,
        chunk=frames.chunk * sub * features_frame2audio_samples,
        right=frames.right * sub * features_frame2audio_samples,
    )
    computer = GreedyBatchedStreamingAEDComputer(model, frame_chunk_size=frames.chunk, decoding_cfg=decoding_cfg)
    decoder_input_ids = return_decoder_input_ids(cfg, model)
    dataset = SimpleAudioDataset([str(p) for p in paths], sample_rate=sample_rate)
    audio = AudioBatch.collate_fn([dataset[i] for i in range(len(paths))])

    with torch.no_grad(), torch.inference_mode():
        audio_batch, audio_batch_lengths = audio.audio_signals, audio.audio_signal_lengths
        batch = audio_batch.shape[0]
        state = GreedyBatchedStreamingAEDComputer.initialize_aed_model_state(
            asr_model=model, decoder_input_ids=decoder_input_ids, batch_size=batch,
            context_encoder_frames=frames, chunk_secs=chunk_secs, right_context_secs=right_secs,
        )
        if per_step is not None:
            state.max_tokens_per_alignatt_step = per_step
        left_sample = 0
        end_of_window_sample = min(samples.chunk, audio_batch.shape[1])
        right_sample = min(samples.chunk + samples.right, audio_batch.shape[1])
        buffer = StreamingBatchedAudioBuffer(batch_size=batch, context_samples=samples, dtype=audio_batch.dtype,
                                             device=audio_batch.device)
        rest = audio_batch_lengths.clone()
        steps = 0
        while left_sample < audio_batch.shape[1]:
            chunk_length = min(right_sample, audio_batch.shape[1]) - left_sample
            is_last_chunk_batch = chunk_length >= rest
            is_last_chunk = right_sample >= audio_batch.shape[1]
            chunk_lengths = torch.where(is_last_chunk_batch, rest, torch.full_like(rest, fill_value=chunk_length))
            buffer.add_audio_batch_(audio_batch[:, left_sample:right_sample], audio_lengths=chunk_lengths,
                                    is_last_chunk=is_last_chunk,
                                    is_last_chunk_batch=torch.zeros_like(is_last_chunk_batch))
            state.is_last_chunk_batch = is_last_chunk_batch
            _, encoded_len, enc_states, _ = model(input_signal=buffer.samples,
                                                  input_signal_length=buffer.context_size_batch.total())
            ctx = buffer.context_size_batch.subsample(factor=encoder_frame2audio_samples)
            encoded_len_no_rc = ctx.left + ctx.chunk
            corrected = torch.where(is_last_chunk_batch, encoded_len, encoded_len_no_rc)
            mask = lens_to_mask(corrected, enc_states.shape[1]).to(enc_states.dtype)
            state.prev_encoder_shift = max(
                end_of_window_sample // encoder_frame2audio_samples - frames.left - frames.chunk, 0
            )
            state = computer(encoder_output=enc_states, encoder_output_len=corrected, encoder_input_mask=mask,
                             prev_batched_state=state)
            rest -= chunk_lengths
            left_sample = right_sample
            right_sample = min(right_sample + samples.chunk, audio_batch.shape[1])
            end_of_window_sample += samples.chunk
            steps += 1

        prompt_len = state.decoder_input_ids.size(-1)
        tokens, alignments = [], []
        for i in range(batch):
            end = int(state.current_context_lengths[i])
            tokens.append(state.pred_tokens_ids[i, prompt_len:end])
            alignments.append(state.tokens_frame_alignment[i])
        records = [{"text": t, "duration": float(n) / sample_rate} for t, n in zip(texts, audio_batch_lengths)]
        fs = sub * stride * 1000
        if policy == "waitk":
            laal = computer.compute_waitk_lagging(records, tokens, frames, fs, BOW_PREFIX="\u2581")
        else:
            laal = computer.compute_alignatt_lagging(records, tokens, alignments, frames, fs, BOW_PREFIX="\u2581")
    return {
        "prompt": [int(t) for t in decoder_input_ids[0].tolist()],
        "frames": [frames.left, frames.chunk, frames.right],
        "steps": steps,
        "tokens": [[int(t) for t in row.tolist()] for row in tokens],
        "alignment": [[int(a) for a in al[prompt_len : prompt_len + len(row)].tolist()]
                      for al, row in zip(alignments, tokens)],
        "laal": [float(x) for x in laal],
    }


def cases():
    """(variant, policy, setting, clip, knobs) of every batch-1 case."""
    for variant in VARIANTS:
        for policy in POLICIES:
            for setting in SETTINGS:
                for clip in CLIPS:
                    yield variant, policy, setting, clip, {}
    for policy, knobs in KNOBS:
        for clip in KNOB_CLIPS:
            yield KNOB_VARIANT, policy, KNOB_SETTING, clip, knobs
    for variant in AST_VARIANTS:
        for policy in POLICIES:
            yield variant, policy, KNOB_SETTING, "speech", {"prompt": "ast"}
    yield from LIMIT_CASES


def _one(model, out, files, clip_names, policy, setting, batch_size, knobs=None):
    paths = [out / files[c]["file"] for c in clip_names]
    texts = [files[c]["text"] for c in clip_names]
    knobs = dict(knobs or {})
    prompt = AST_PROMPT if knobs.pop("prompt", None) == "ast" else PROMPT
    start = time.time()
    try:
        result = run_driver(model, paths, texts, policy, SETTINGS[setting], batch_size, knobs, prompt)
    except Exception as e:  # NeMo refusing or crashing on a case is itself the reference
        result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    result["seconds"] = round(time.time() - start, 2)
    return result


def build(oracle: Path) -> None:
    out = oracle / "streaming"
    files = write_clips(oracle)
    results, batched = [], []
    for variant in VARIANTS:
        model = load_model(oracle / variant / "model.nemo")
        for v, policy, setting, clip, knobs in cases():
            if v != variant:
                continue
            r = _one(model, out, files, [clip], policy, setting, 1, knobs)
            results.append({"variant": variant, "policy": policy, "setting": setting, "clip": clip,
                            "knobs": knobs, **r})
            print(variant, policy, setting, clip, knobs, r.get("error", r.get("tokens", [[]])[0][:8]),
                  r["seconds"], flush=True)
        if variant == BATCH_VARIANT:
            for policy in POLICIES:
                r = _one(model, out, files, list(BATCH_CLIPS), policy, BATCH_SETTING, len(BATCH_CLIPS))
                singles = [_one(model, out, files, [c], policy, BATCH_SETTING, 1) for c in BATCH_CLIPS]
                batched.append({"variant": variant, "policy": policy, "setting": BATCH_SETTING,
                                "clips": list(BATCH_CLIPS), "batched": r, "single": singles})
    data = {"key": key(oracle), "settings": SETTINGS, "prompt_slots": PROMPT, "clips": files,
            "cases": results, "batched": batched}
    (out / OUTPUT).write_text(json.dumps(data))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--oracle", type=Path, default=nemo_oracle.oracle_dir_default())
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    nemo_oracle.quiet_nemo()
    nemo_oracle.setup_torch()
    if args.force or not is_fresh(args.oracle):
        build(args.oracle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
