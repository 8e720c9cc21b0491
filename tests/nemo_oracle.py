"""NeMo parity oracle: builds tiny random-weight Canary models with NeMo and writes NeMo's reference outputs to disk.

Run with an interpreter that has NeMo 3.0 (torch CPU):

    python tests/nemo_oracle.py --out tests/.cache/oracle [--variant NAME ...] [--force]

For each model variant it trains tiny SentencePiece tokenizers, builds an `EncDecMultiTaskModel` with NeMo's own
classes, reshapes the random weights so that greedy decoding is varied and numerically unambiguous, saves a real
`.nemo` archive, restores it, and records (from the restored model, eval mode):

  <out>/oracle.json                      cache key, versions, variants, timings
  <out>/audio/                           speech corpus (tests/audio_fixtures.py) + audio.json
  <out>/nemo_inputs/<clip>.npy           every clip's waveform as NeMo's own loader gives it (lhotse: soundfile +
                                         scipy resample_poly); multi-channel clips: the mean of its channels
                                         (NeMo loads one channel per channel_selector; mlx-canary's default is the
                                         mean, so the mean of NeMo's channel loads is the reference)
  <out>/nemo_inputs/<clip>.wav           float32 16 kHz WAV of that waveform, for non-16k-mono clips (what NeMo is
                                         given for them: NeMo refuses multi-channel files without a selector)
  <out>/<variant>/model.nemo             the archive
  <out>/<variant>/reference.json         manifest: config summary, decoding config, clips, prompts, greedy results
  <out>/<variant>/reference.npz          arrays (names listed in reference.json["arrays"])
  <out>/<variant>/tokenizer.json         tokenizer / prompt-builder references

reference.npz (float32 unless noted; <clip> = audio clip name, <prompt> = prompt name from reference.json):
  features/<clip>               (n_mels, T_feat) preprocessor on the NeMo-loaded waveform, B=1, config pad_to
  features_len/<clip>           () int64 valid frames = len(wave) // 160
  audio_padded1s/<clip>         (16000,) what transcribe() fed for clips < 1 s (zero-padded both sides)
  features_padded1s[_len]/<clip>  features of that padded audio (pad_to 0, as transcribe() runs it)
  encoder/<clip>/pre_encode     (T_enc, d) subsampling output (before xscaling); pre_encode_len ()
  encoder/<clip>/xscaled        (T_enc, d) after x*sqrt(d) (xscaling variants only)
  encoder/<clip>/pos_emb        (2*T_enc-1, d) relative positional table fed to every layer
  encoder/<clip>/layer<i>       (T_enc, d) output of conformer layer i
  encoder/<clip>/output         (T_enc, d) encoder output; length () int64 valid frames
  encoder/<clip>/enc_states     (T_enc, D) after encoder_decoder_proj (= output when there is none)
  decoder/<clip>/<prompt>/input_ids   (L,) int64 prompt + greedy tokens
  decoder/<clip>/<prompt>/log_probs   (L, head_rows) teacher-forced log-softmax (row i predicts token i+1)
  batched/audio, audio_len, features, features_len, encoder_output, encoder_len, enc_states: the padded batch of
                                every clip (first batched prompt), B = number of clips
The encoder arrays use the audio transcribe() fed the model, with pad_to 0 (transcribe() forces it); T_enc is
the padded length, compare the first `length` frames.

Importing this module does not import NeMo or torch (conftest uses `is_fresh` / `cache_key`).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import audio_fixtures  # noqa: E402

sys.path.insert(0, str(HERE.parent / "scripts"))
from nemo_support import QuietStderr, quiet_nemo, reset_restore_state  # noqa: E402

FORMAT_VERSION = 1
DEFAULT_OUT = HERE / ".cache" / "oracle"
ENV_DIR = "MLX_CANARY_ORACLE_DIR"

# Greedy steps whose top-1/top-2 log-prob gap is below this are treated as ambiguous when choosing seeds; the
# smallest gap actually reached is recorded per result ("min_margin").
MIN_MARGIN = 1e-3
# Timestamp tokens <|0|>..<|N-1|> in the canary2 aggregate variant (80 ms frames; covers 16 s of audio).
N_TIMESTAMP_TOKENS = 200

# --------------------------------------------------------------------------------------------------------------
# Text for the tiny tokenizers (punctuation, digits, accents on purpose).

LANG_TEXT = {
    "en": [
        "The quick brown fox jumps over the lazy dog.",
        "Please call Stella. Ask her to bring these things with her from the store: six spoons of fresh snow peas.",
        "Yes, I will meet you at 10:30 on Friday, the 3rd of May.",
        "How are you today? I'm fine, thank you!",
        "Stereo recordings are mixed down to one channel.",
        "She sells sea shells by the sea shore; 42 of them were blue.",
        "Hello world, this is a small test of the English tokenizer.",
        "We paid $25.99 for two tickets and a coffee.",
        "Numbers like 1, 2, 3, 100 and 2024 appear in text.",
        "Where is the station? Turn left, then walk straight ahead.",
        "The weather is nice and warm in the summer.",
        "Good morning, good evening, and good night.",
    ],
    "de": [
        "Guten Morgen! Wie geht es Ihnen heute? Ich hoffe, gut.",
        "Die Straße hat zwölf Häuser und drei große Bäume.",
        "Wir treffen uns um 10:30 Uhr am Bahnhof.",
        "Das Wetter ist schön, die Sonne scheint über München.",
        "Können Sie mir bitte helfen? Ich suche die Bäckerei.",
        "Hallo Welt, das ist ein kleiner Test für Deutsch.",
        "Er hat 25 Äpfel und 3 Birnen gekauft.",
        "Fünf Füchse laufen über die grüne Wiese.",
        "Ich möchte ein Glas Wasser, bitte.",
        "Die Kinder spielen im Garten; es ist Frühling.",
    ],
    "es": [
        "¿Qué tiempo hace hoy en Madrid? Hace sol y mucho calor.",
        "El veloz murciélago hindú comía feliz cardillo y kiwi.",
        "Mañana tenemos una reunión a las 10:30 en la oficina.",
        "¡Hola mundo! Esto es una pequeña prueba en español.",
        "Compré 12 naranjas y 3 limones en el mercado.",
        "La niña canta una canción muy bonita.",
        "¿Dónde está la estación? Siga recto, por favor.",
        "El año 2024 fue muy interesante para todos.",
        "Me gusta leer libros y escuchar música.",
        "Buenos días, buenas tardes y buenas noches.",
    ],
    "fr": [
        "Bonjour, je m'appelle Marie et j'habite à Paris depuis dix ans.",
        "Où est la gare ? Tournez à gauche, puis continuez tout droit.",
        "Nous avons rendez-vous à 10h30 au café près de l'hôtel.",
        "Le garçon mange une pêche et une crème brûlée.",
        "Il fait très beau aujourd'hui ; le ciel est bleu.",
        "Salut tout le monde, ceci est un petit test en français.",
        "J'ai acheté 3 baguettes et 12 croissants.",
        "Ça va très bien, merci beaucoup !",
        "L'été dernier, nous sommes allés à la mer.",
        "Noël arrive bientôt, les enfants sont contents.",
    ],
}

# Texts whose NeMo tokenization is recorded (per language, plus mixed-script / edge cases).
TOKENIZER_SAMPLES = {
    "en": ["Hello world.", "The quick brown fox, 42 times!", "  double  spaces  ", "naïve café", "", "x"],
    "de": ["Grüße aus München!", "Die Straße 12.", "ÄÖÜ äöü ß", "hallo welt"],
    "es": ["¿Qué tal? ¡Muy bien!", "Año 2024, niño.", "canción"],
    "fr": ["Ça va ? Très bien !", "L'été à l'hôtel, 10h30.", "crème brûlée"],
}

# --------------------------------------------------------------------------------------------------------------
# Variants.

CANARY2_SPECIALS = [
    "translate",
    "transcribe",
    "en",
    "de",
    "es",
    "fr",
    "startofcontext",
    "emo:undefined",
    "emo:neutral",
    "emo:angry",
    "emo:happy",
    "emo:sad",
    "itn",
    "noitn",
    "timestamp",
    "notimestamp",
    "diarize",
    "nodiarize",
    "spltoken0",
    "spltoken1",
]
CANARY1_SPECIALS = ["translate", "transcribe", "en", "de", "nospeech_alias"]

PROMPTS_CANARY2 = {
    "asr_en_pnc": dict(source_lang="en", target_lang="en", pnc="yes"),
    "asr_en_nopnc": dict(source_lang="en", target_lang="en", pnc="no"),
    "asr_de_pnc": dict(source_lang="de", target_lang="de", pnc="yes"),
    "asr_de_nopnc": dict(source_lang="de", target_lang="de", pnc="no"),
    "asr_es_pnc": dict(source_lang="es", target_lang="es", pnc="yes"),
    "asr_fr_pnc": dict(source_lang="fr", target_lang="fr", pnc="yes"),
    "ast_en_de": dict(source_lang="en", target_lang="de", pnc="yes"),
    "ast_de_en": dict(source_lang="de", target_lang="en", pnc="yes"),
    "ast_en_fr": dict(source_lang="en", target_lang="fr", pnc="yes"),
}
PROMPTS_CANARY1 = {
    "asr_en_pnc": dict(source_lang="en", target_lang="en", taskname="asr", pnc="yes"),
    "asr_en_nopnc": dict(source_lang="en", target_lang="en", taskname="asr", pnc="no"),
    "asr_de_pnc": dict(source_lang="de", target_lang="de", taskname="asr", pnc="yes"),
    "ast_en_de": dict(source_lang="en", target_lang="de", taskname="ast", pnc="yes"),
    "ast_de_en": dict(source_lang="de", target_lang="en", taskname="ast", pnc="no"),
}

VARIANTS = {
    "agg_canary2_proj": dict(
        tokenizer="agg",
        langs=["en", "de", "es", "fr"],
        lang_vocab={"en": 96, "de": 96, "es": 80, "fr": 80},
        specials=CANARY2_SPECIALS + [str(i) for i in range(N_TIMESTAMP_TOKENS)],
        prompt_format="canary2",
        prompts=dict(PROMPTS_CANARY2, asr_en_pnc_timestamps=dict(source_lang="en", target_lang="en", pnc="yes",
                                                                  timestamps=True)),
        batched_prompts=["asr_en_pnc", "ast_en_de"],
        n_mels=128,
        pad_to=0,
        enc_d=64,
        enc_layers=2,
        enc_heads=4,
        sub_channels=32,
        xscaling=False,
        dec_d=96,
        dec_layers=2,
        dec_heads=4,
        max_seq=256,
        # NeMo reads greedy.temperature / greedy.n_samples unguarded: a greedy YAML block must carry them.
        decoding=dict(strategy="greedy_batch", greedy=dict(max_generation_delta=50, temperature=None, n_samples=1)),
        seed=12234,  # first seed (of 1234 + k*1000) that passed the checks
    ),
    "agg_canary1": dict(
        tokenizer="agg",
        langs=["en", "de"],
        lang_vocab={"en": 64, "de": 64},
        specials=CANARY1_SPECIALS,
        prompt_format="canary",
        prompts=PROMPTS_CANARY1,
        batched_prompts=["asr_en_pnc", "ast_en_de"],
        n_mels=80,
        pad_to=16,
        enc_d=64,
        enc_layers=2,
        enc_heads=4,
        sub_channels=16,
        xscaling=True,
        dec_d=64,
        dec_layers=2,
        dec_heads=4,
        max_seq=192,
        # As NeMo's example AED config: beam of size 1; `len_pen` is a key NeMo's beam builder does not read.
        decoding=dict(strategy="beam", return_best_hypothesis=True,
                      beam=dict(beam_size=1, len_pen=0.0, max_generation_delta=50)),
        seed=10345,  # first seed (of 2345 + k*1000) that passed the checks
    ),
    "spe_canary2": dict(
        tokenizer="spe",
        langs=["en", "de", "es", "fr"],
        spe_vocab=160,
        specials=CANARY2_SPECIALS,
        prompt_format="canary2",
        prompts={k: PROMPTS_CANARY2[k] for k in ("asr_en_pnc", "asr_en_nopnc", "asr_de_pnc", "asr_fr_pnc",
                                                  "ast_en_de", "ast_de_en")},
        batched_prompts=["asr_en_pnc"],
        n_mels=128,
        pad_to=0,
        enc_d=64,
        enc_layers=3,
        enc_heads=4,
        sub_channels=24,
        xscaling=False,
        dec_d=64,
        dec_layers=2,
        dec_heads=4,
        max_seq=128,
        decoding=dict(strategy="greedy", greedy=dict(max_generation_delta=-1, temperature=None, n_samples=1)),
        seed=3456,
        shaping=dict(self_qk_scale=4.0, cross_qk_scale=4.0),  # the small single vocabulary cycles more easily
    ),
}

# Weight shaping knobs (see shape_weights).
SHAPING = dict(
    emb_ln_gain=1.0,  # embedding LayerNorm gain (its signs are randomised: see shape_weights)
    logit_scale=40.0,  # final LayerNorm gain = std of the output logits
    bias_std=0.1,
    enc_bias_std=0.02,
    ln_gain_jitter=0.1,
    self_qk_scale=3.0,  # sharper decoder self-attention (follow the prompt)
    cross_qk_scale=3.0,  # sharper cross-attention (follow individual audio frames)
    cross_out_scale=2.0,
    ffn_out_scale=2.0,
    max_seed_tries=16,
    eos_frac_range=(0.3, 0.85),  # share of B=1 greedy results that should end with EOS before the length cap
    min_tokens=3,
)


# --------------------------------------------------------------------------------------------------------------
# Cache key (no NeMo import).


def _versions() -> dict:
    out = {}
    for dist in ("nemo_toolkit", "torch", "sentencepiece", "lhotse", "numpy", "scipy", "soundfile"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def params() -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "variants": VARIANTS,
        "shaping": SHAPING,
        "min_margin": MIN_MARGIN,
        "lang_text": LANG_TEXT,
        "tokenizer_samples": TOKENIZER_SAMPLES,
    }


def script_sha() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def cache_key(with_versions: bool = True) -> dict:
    key = {
        "script_sha": script_sha(),
        "params_sha": hashlib.sha256(json.dumps(params(), sort_keys=True, default=str).encode()).hexdigest()[:16],
        "audio_spec": audio_fixtures.spec_hash(),
    }
    if with_versions:
        key["versions"] = _versions()
    return key


def oracle_dir_default() -> Path:
    return Path(os.environ.get(ENV_DIR) or DEFAULT_OUT)


def is_fresh(out: str | Path, variants=None, check_versions: bool = True) -> bool:
    """True if `out` holds a complete oracle built by this script with the same parameters."""
    out = Path(out)
    try:
        meta = json.loads((out / "oracle.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    want = cache_key(with_versions=check_versions)
    have = meta.get("key", {})
    if any(have.get(k) != v for k, v in want.items()):
        return False
    if not set(variants or VARIANTS) <= set(meta.get("variants", [])):
        return False
    for v in variants or VARIANTS:
        for f in ("model.nemo", "reference.json", "reference.npz", "tokenizer.json"):
            if not (out / v / f).exists():
                return False
    return True


def load_reference(out: str | Path, variant: str) -> tuple[dict, dict]:
    """(reference.json as a dict, reference.npz as a dict of numpy arrays) of one variant."""
    vdir = Path(out) / variant
    meta = json.loads((vdir / "reference.json").read_text())
    with np.load(vdir / "reference.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return meta, arrays


# --------------------------------------------------------------------------------------------------------------
# NeMo side. Everything below imports torch / NeMo lazily.


def setup_torch() -> None:
    """Settings every process that runs these models should use (also scripts that reuse the oracle's models).

    The shaped decoders attend sharply, which leaves subnormal probabilities; x86 arithmetic on subnormals is ~100x
    slower (a build took 8 min instead of 1). Flushing them to zero changes values below 1.2e-38 only, but
    `set_flush_denormal` covers the calling thread only, hence one intra-op thread (the tiny models gain nothing
    from more).
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)


def _train_spm(text_lines: list[str], vocab_size: int, out_dir: Path, user_symbols=None) -> Path:
    import sentencepiece as spm

    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import create_spt_model

    out_dir.mkdir(parents=True, exist_ok=True)
    data = out_dir / "train_text.txt"
    data.write_text("\n".join(text_lines) + "\n", encoding="utf-8")
    spm.set_random_generator_seed(1)  # create_spt_model shuffles its input
    with QuietStderr():
        create_spt_model(
            str(data),
            vocab_size=vocab_size,
            sample_size=-1,
            do_lower_case=False,
            tokenizer_type="bpe",
            output_dir=str(out_dir),
            user_defined_symbols=user_symbols,
        )
    return out_dir


def make_tokenizer_cfg(spec: dict, work: Path) -> dict:
    from nemo.collections.common.tokenizers.canary_tokenizer import DEFAULT_TOKENS, CanaryTokenizer

    if spec["tokenizer"] == "agg":
        import sentencepiece as spm

        spm.set_random_generator_seed(1)
        spl_dir = work / "spl_tokens"
        with QuietStderr():
            CanaryTokenizer.build_special_tokenizer(spec["specials"], spl_dir, force_rebuild=True)
        langs = {"spl_tokens": {"dir": str(spl_dir), "type": "bpe"}}
        for lang in spec["langs"]:
            d = _train_spm(LANG_TEXT[lang], spec["lang_vocab"][lang], work / f"tok_{lang}")
            langs[lang] = {"dir": str(d), "type": "bpe"}
        return {
            "dir": None,
            "type": "agg",
            "langs": langs,
            "custom_tokenizer": {
                "_target_": "nemo.collections.common.tokenizers.canary_tokenizer.CanaryTokenizer",
                "tokenizer": None,
            },
        }
    # Single SentencePiece model with every special token as a user-defined symbol (canary-1b-v2 style).
    specials = list(DEFAULT_TOKENS) + [f"<|{t}|>" for t in spec["specials"]]
    lines = [s for lang in spec["langs"] for s in LANG_TEXT[lang]]
    d = _train_spm(lines, spec["spe_vocab"] + len(specials) + 1, work / "tok_spe", user_symbols=specials)
    return {
        "dir": str(d),
        "type": "bpe",
        "custom_tokenizer": {"_target_": "nemo.collections.common.tokenizers.canary_tokenizer.CanaryBPETokenizer"},
    }


def make_model_cfg(spec: dict, tokenizer_cfg: dict) -> dict:
    if spec["prompt_format"] == "canary2":
        prompt_defaults = [
            {
                "role": "user",
                "slots": {
                    "decodercontext": "",
                    "emotion": "<|emo:undefined|>",
                    "source_lang": "<|en|>",
                    "target_lang": "<|en|>",
                    "pnc": "<|pnc|>",
                    "itn": "<|noitn|>",
                    "timestamp": "<|notimestamp|>",
                    "diarize": "<|nodiarize|>",
                },
            },
            {"role": "user_partial", "slots": {"decodercontext": ""}},
        ]
    else:
        prompt_defaults = [
            {
                "role": "user",
                "slots": {"source_lang": "<|en|>", "target_lang": "<|en|>", "task": "<|transcribe|>", "pnc": "<|pnc|>"},
            }
        ]
    enc_d, dec_d = spec["enc_d"], spec["dec_d"]
    return {
        "sample_rate": 16000,
        "label_smoothing": 0.0,
        "prompt_format": spec["prompt_format"],
        "prompt_defaults": prompt_defaults,
        "model_defaults": {"asr_enc_hidden": enc_d, "lm_enc_hidden": dec_d, "lm_dec_hidden": dec_d},
        "tokenizer": tokenizer_cfg,
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "sample_rate": 16000,
            "normalize": "per_feature",
            "window_size": 0.025,
            "window_stride": 0.01,
            "window": "hann",
            "features": spec["n_mels"],
            "n_fft": 512,
            "log": True,
            "frame_splicing": 1,
            "dither": 1e-5,
            "pad_to": spec["pad_to"],
            "pad_value": 0.0,
        },
        "spec_augment": None,
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConformerEncoder",
            "feat_in": spec["n_mels"],
            "feat_out": -1,
            "n_layers": spec["enc_layers"],
            "d_model": enc_d,
            "subsampling": "dw_striding",
            "subsampling_factor": 8,
            "subsampling_conv_channels": spec["sub_channels"],
            "causal_downsampling": False,
            "ff_expansion_factor": 4,
            "self_attention_model": "rel_pos",
            "n_heads": spec["enc_heads"],
            "att_context_size": [-1, -1],
            "xscaling": spec["xscaling"],
            "untie_biases": True,
            "pos_emb_max_len": 5000,
            "conv_kernel_size": 9,
            "conv_norm_type": "batch_norm",
            "conv_context_size": None,
            "use_bias": True,
            "dropout": 0.0,
            "dropout_pre_encoder": 0.0,
            "dropout_emb": 0.0,
            "dropout_att": 0.0,
        },
        "transf_encoder": {
            "_target_": "nemo.collections.asr.modules.transformer.transformer_encoders.TransformerEncoder",
            "num_layers": 0,
            "hidden_size": dec_d,
            "inner_size": 4 * dec_d,
            "num_attention_heads": 4,
            "ffn_dropout": 0.0,
            "attn_score_dropout": 0.0,
            "attn_layer_dropout": 0.0,
            "mask_future": False,
            "pre_ln": True,
            "pre_ln_final_layer_norm": True,
        },
        "transf_decoder": {
            "_target_": "nemo.collections.asr.modules.transformer.get_nemo_transformer",
            "model_name": None,
            "pretrained": False,
            "encoder": None,
            "pre_ln_final_layer_norm": True,
            "config_dict": {
                "max_sequence_length": spec["max_seq"],
                "num_token_types": 0,
                "embedding_dropout": 0.0,
                "learn_positional_encodings": False,
                "hidden_size": dec_d,
                "inner_size": 4 * dec_d,
                "num_layers": spec["dec_layers"],
                "num_attention_heads": spec["dec_heads"],
                "ffn_dropout": 0.0,
                "attn_score_dropout": 0.0,
                "attn_layer_dropout": 0.0,
                "hidden_act": "relu",
                "pre_ln": True,
                "vocab_size": None,
            },
        },
        "head": {
            "_target_": "nemo.collections.asr.parts.submodules.token_classifier.TokenClassifier",
            "num_layers": 1,
            "activation": "relu",
            "log_softmax": True,
            "hidden_size": dec_d,
            "num_classes": None,
            "dropout": 0.0,
            "use_transformer_init": True,
        },
        "decoding": spec["decoding"],
        "loss": {
            "_target_": "nemo.collections.common.losses.smoothed_cross_entropy.SmoothedCrossEntropyLoss",
            "label_smoothing": 0.0,
            "pad_id": None,
        },
    }


# --------------------------------------------------------------------------------------------------------------
# Weight shaping.


def shape_weights(model, seed: int, knobs: dict) -> None:
    """Make random weights decode like a (nonsense) language model instead of echoing one token.

    Untouched random weights make greedy decoding repeat one token: the current token's embedding reaches the
    tied output projection through the residual stream and wins every step. The changes:
    - every bias, LayerNorm gain, BatchNorm statistic and `pos_bias_u/v` gets non-trivial random values, so a port
      that mixes them up fails the comparison;
    - subsampling convs He-scaled, encoder biases small: the encoder output follows the audio instead of being one
      bias-driven vector, so the decoder's output depends on the clip;
    - tied embeddings centred (no shared direction favouring the same tokens at every step);
    - embedding LayerNorm gains get random signs: the token stays fully visible to attention and FFN, but its
      direct echo E[t]·(E[t]*signs) averages out, so the next token is a pseudo-random function of the context;
    - decoder attention query/key scaled up (sharper attention to prompt and audio frames), cross-attention and
      FFN outputs scaled up (they dominate the residual stream);
    - final LayerNorm gain = logit scale, so greedy top-1/top-2 gaps are far above float32 rounding;
    - head rows for pad and the vocabulary padding get a large negative bias (never chosen: NeMo cannot detokenize
      padding ids, and a mid-sequence pad only adds noise); the EOS bias is set later by `calibrate`.
    """
    import torch

    g = torch.Generator().manual_seed(seed + 7)

    def randn(shape, std):
        return torch.randn(shape, generator=g) * std

    tok = model.tokenizer
    vocab = tok.vocab_size
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.copy_(1.0 + randn(mod.weight.shape, knobs["ln_gain_jitter"]))
                mod.bias.copy_(randn(mod.bias.shape, knobs["bias_std"]))
            elif isinstance(mod, torch.nn.BatchNorm1d):
                mod.weight.copy_(1.0 + randn(mod.weight.shape, knobs["ln_gain_jitter"]))
                mod.bias.copy_(randn(mod.bias.shape, knobs["bias_std"]))
                mod.running_mean.copy_(randn(mod.running_mean.shape, 0.2))
                mod.running_var.copy_(0.5 + torch.rand(mod.running_var.shape, generator=g) * 1.5)
            elif isinstance(mod, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)) and mod.bias is not None:
                if name.startswith("log_softmax"):
                    continue
                mod.bias.copy_(randn(mod.bias.shape, knobs["bias_std"]))
        for name, p in model.encoder.named_parameters():
            if name.endswith("pos_bias_u") or name.endswith("pos_bias_v"):
                p.copy_(randn(p.shape, 0.3))
        # Subsampling: He-scaled convs and small biases, so the output varies with the audio instead of being
        # dominated by a constant (bias-driven) vector that the conformer LayerNorms would then amplify.
        for mod in model.encoder.pre_encode.modules():
            if isinstance(mod, torch.nn.Conv2d):
                fan_in = mod.weight[0].numel()
                mod.weight.copy_(randn(mod.weight.shape, math.sqrt(2.0 / fan_in)))
                mod.bias.copy_(randn(mod.bias.shape, knobs["enc_bias_std"]))
        for mod in model.encoder.modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv1d)) and mod.bias is not None:
                mod.bias.copy_(randn(mod.bias.shape, knobs["enc_bias_std"]))

        dec = model.transf_decoder
        emb = dec.embedding.token_embedding.weight  # tied with the head
        emb.sub_(emb[:vocab].mean(dim=0, keepdim=True))
        eln = dec.embedding.layer_norm
        signs = torch.where(torch.rand(eln.weight.shape, generator=g) < 0.5, -1.0, 1.0)
        eln.weight.mul_(knobs["emb_ln_gain"] * signs)
        eln.bias.mul_(knobs["emb_ln_gain"])
        for layer in dec.decoder.layers:
            for att, qk, out in ((layer.first_sub_layer, knobs["self_qk_scale"], 1.0),
                                 (layer.second_sub_layer, knobs["cross_qk_scale"], knobs["cross_out_scale"])):
                att.query_net.weight.mul_(qk)
                att.key_net.weight.mul_(qk)
                att.out_projection.weight.mul_(out)
            layer.third_sub_layer.dense_out.weight.mul_(knobs["ffn_out_scale"])
        fln = dec.decoder.final_layer_norm
        fln.weight.copy_(knobs["logit_scale"] * (1.0 + randn(fln.weight.shape, knobs["ln_gain_jitter"])))
        fln.bias.copy_(randn(fln.bias.shape, knobs["bias_std"]))

        head = model.log_softmax.mlp.layer0
        bias = randn(head.bias.shape, 0.5)
        bias[vocab:] = -60.0
        bias[tok.pad_id] = -60.0
        head.bias.copy_(bias)


# --------------------------------------------------------------------------------------------------------------
# Helpers.


def _np(t):
    return t.detach().cpu().numpy()


def _prompt_ids(model, kwargs: dict) -> list[int]:
    """The prompt transcribe() builds for a file input with these kwargs (mirrors its manifest + prompt-fn path)."""
    from nemo.collections.common.tokenizers.canary_tokenizer import CANARY_SPECIAL_TOKENIZER

    entry = {"source_lang": "en", "target_lang": "en", "taskname": "asr", "pnc": "yes", "timestamp": "notimestamp"}
    for k, v in kwargs.items():
        if k == "timestamps":
            entry["timestamp"] = "yes" if v else "no"
        else:
            entry[k] = v
    if model.prompt_format == "canary2":
        slots = {
            "source_lang": entry["source_lang"],
            "target_lang": entry["target_lang"],
            "decodercontext": entry.get("decodercontext", ""),
            "emotion": entry.get("emotion", "<|emo:undefined|>"),
            "itn": entry.get("itn", "<|noitn|>"),
            "timestamp": entry["timestamp"],
            "diarize": entry.get("diarize", "<|nodiarize|>"),
            "pnc": entry["pnc"],
        }
    else:
        slots = {
            "source_lang": entry["source_lang"],
            "target_lang": entry["target_lang"],
            "task": entry["taskname"],
            "pnc": entry["pnc"],
        }
    slots[model.prompt.PROMPT_LANGUAGE_SLOT] = CANARY_SPECIAL_TOKENIZER
    return model.prompt.encode_dialog([{"role": "user", "slots": slots}])["context_ids"].tolist()


def _find_offset(padded: np.ndarray, wave: np.ndarray) -> int:
    """Where `wave` sits inside the zero-padded `padded` (transcribe's 1 s minimum)."""
    for off in range(len(padded) - len(wave) + 1):
        if np.array_equal(padded[off : off + len(wave)], wave):
            return off
    raise AssertionError("transcribe() changed the samples of a short clip, not just padded it")


def _length_cap(model, t_enc_padded: int, prompt_len: int) -> dict:
    """NeMo's generation cap (transformer_generators._prepare_for_search) for the model's decoding config."""
    cfg = model.cfg.decoding
    strategy = cfg.strategy
    sub = cfg.beam if strategy == "beam" else cfg.greedy
    delta = int(sub.get("max_generation_delta", -1))
    max_seq = int(model.transf_decoder.max_sequence_length)
    eff = min(max_seq, t_enc_padded + delta) if delta >= 0 else max_seq
    gen = eff - prompt_len
    return {
        "t_enc_padded": int(t_enc_padded),
        "prompt_len": int(prompt_len),
        "max_sequence_length": max_seq,
        "max_generation_delta": delta,
        "max_generation_length": int(gen),
        "max_new_tokens": int(gen + (1 if strategy == "beam" else 0)),
    }


def _margins(log_probs: np.ndarray, start: int, n: int) -> np.ndarray:
    """top-1 minus top-2 log-prob at rows start..start+n-1."""
    rows = log_probs[start : start + n]
    part = np.sort(rows, axis=-1)[:, -2:]
    return part[:, 1] - part[:, 0]


class _Capture:
    """Wraps model._transcribe_forward to record what transcribe() actually fed the model."""

    def __init__(self, model):
        self.model = model
        self.batches = []
        self._orig = model._transcribe_forward

        def wrapped(batch, trcfg):
            out = self._orig(batch, trcfg)
            self.batches.append(
                {
                    "audio": _np(batch.audio).astype(np.float32),
                    "audio_lens": _np(batch.audio_lens).astype(np.int64),
                    "prompt": _np(out["decoder_input_ids"]).astype(np.int64),
                    "prompt_lens": _np(batch.prompt_lens).astype(np.int64) if batch.prompt_lens is not None else None,
                    "enc_states": _np(out["encoder_states"]).astype(np.float32),
                    "enc_len": _np(out["encoded_lengths"]).astype(np.int64),
                    "featurizer_pad_to": int(model.preprocessor.featurizer.pad_to),
                    "featurizer_dither": float(model.preprocessor.featurizer.dither),
                    "decoder_training": bool(model.transf_decoder.training),
                }
            )
            return out

        model._transcribe_forward = wrapped

    def close(self):
        del self.model._transcribe_forward


def _transcribe(model, paths, batch_size, kwargs):
    cap = _Capture(model)
    try:
        hyps = model.transcribe(
            [str(p) for p in paths], batch_size=batch_size, return_hypotheses=True, verbose=False, num_workers=0,
            **kwargs,
        )
    finally:
        cap.close()
        _TRANSCRIBE_SEEN["decoder_training_after_transcribe"].add(bool(model.transf_decoder.training))
        model.eval()  # NeMo leaves the decoder in train mode after transcribe()
    for b in cap.batches:
        _TRANSCRIBE_SEEN["featurizer_pad_to"].add(b["featurizer_pad_to"])
        _TRANSCRIBE_SEEN["featurizer_dither"].add(b["featurizer_dither"])
    return hyps, cap.batches


_TRANSCRIBE_SEEN: dict[str, set] = {
    "decoder_training_after_transcribe": set(), "featurizer_pad_to": set(), "featurizer_dither": set(),
}


def _hyp_record(hyp, tokenizer) -> dict:
    ts = getattr(hyp, "timestamp", None)
    y = [int(i) for i in hyp.y_sequence.tolist()]
    rec = {"y_sequence": y, "text": hyp.text, "raw_text": tokenizer.ids_to_text(y)}
    if isinstance(ts, dict) and any(ts.get(k) for k in ("word", "segment", "char")):
        rec["timestamp"] = {
            k: [{kk: (float(vv) if isinstance(vv, float) else vv) for kk, vv in d.items()} for d in v]
            for k, v in ts.items()
        }
    return rec


class _TranscribePreprocessing:
    """transcribe() runs the preprocessor with dither 0 and pad_to 0 (whatever the config says); do the same."""

    def __init__(self, model):
        self.f = model.preprocessor.featurizer

    def __enter__(self):
        self.saved = (self.f.dither, self.f.pad_to)
        self.f.dither, self.f.pad_to = 0.0, 0
        return self

    def __exit__(self, *_):
        self.f.dither, self.f.pad_to = self.saved
        return False


def _forward_b1(model, wave: np.ndarray):
    """model.forward on one waveform as transcribe() runs it, with hooks: features, pre_encode, pos_enc, layers,
    encoder output."""
    import torch

    rec = {}
    hooks = []

    def keep(name):
        def hook(_mod, _inp, out):
            rec[name] = out

        return hook

    hooks.append(model.preprocessor.register_forward_hook(keep("features")))
    hooks.append(model.encoder.pre_encode.register_forward_hook(keep("pre_encode")))
    hooks.append(model.encoder.pos_enc.register_forward_hook(keep("pos_enc")))
    for i, layer in enumerate(model.encoder.layers):
        hooks.append(layer.register_forward_hook(keep(f"layer{i}")))
    hooks.append(model.encoder.register_forward_hook(keep("encoder")))
    try:
        with torch.no_grad(), _TranscribePreprocessing(model):
            x = torch.from_numpy(wave)[None]
            _, enc_len, enc_states, enc_mask = model.forward(
                input_signal=x, input_signal_length=torch.tensor([len(wave)])
            )
    finally:
        for h in hooks:
            h.remove()
    feats, feat_len = rec["features"]
    pre, pre_len = rec["pre_encode"]
    pos_x, pos_emb = rec["pos_enc"]
    enc_out, enc_out_len = rec["encoder"]
    arrays = {
        "features": _np(feats[0]),
        "features_len": np.array(int(feat_len[0])),
        "pre_encode": _np(pre[0]),
        "pre_encode_len": np.array(int(pre_len[0])),
        "pos_emb": _np(pos_emb[0]),
        "output": _np(enc_out[0].transpose(0, 1)),
        "length": np.array(int(enc_out_len[0])),
        "enc_states": _np(enc_states[0]),
    }
    if model.cfg.encoder.xscaling:
        arrays["xscaled"] = _np(pos_x[0])
    for i in range(len(model.encoder.layers)):
        arrays[f"layer{i}"] = _np(rec[f"layer{i}"][0])
    return arrays, enc_states, enc_mask


def _teacher_forced(model, enc_states, enc_mask, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        inp = torch.tensor([ids], dtype=torch.long)
        dec = model.transf_decoder(
            input_ids=inp, decoder_mask=torch.ones_like(inp, dtype=enc_states.dtype),
            encoder_embeddings=enc_states, encoder_mask=enc_mask,
        )
        return _np(model.log_softmax(hidden_states=dec)[0])


def _check_tf(lp: np.ndarray, prompt_len: int, y: list[int], eos: int, ended: bool) -> dict:
    n_dec = len(y) + (1 if ended else 0)
    expect = list(y) + ([eos] if ended else [])
    am = lp[prompt_len - 1 : prompt_len - 1 + n_dec].argmax(-1).tolist()
    m = _margins(lp, prompt_len - 1, n_dec)
    return {
        "min_margin": float(m.min()) if len(m) else None,
        "argmax_matches": am == expect,
        "n_decisions": n_dec,
    }


def _degenerate(y: list[int], min_tokens: int) -> str | None:
    """Why a greedy result is too trivial to test a decoder with (None if it is fine)."""
    if len(y) < min_tokens:
        return f"only {len(y)} tokens"
    need = min(5, max(2, math.ceil(len(y) / 4)))
    if len(set(y)) < need:
        return f"{len(set(y))} distinct tokens in {len(y)}"
    run = best = 1
    for a, b in zip(y, y[1:]):
        run = run + 1 if a == b else 1
        best = max(best, run)
    if best > max(4, len(y) // 3):
        return f"run of {best} equal tokens"
    return None


# --------------------------------------------------------------------------------------------------------------
# Seed / EOS calibration on the in-memory model (before save).


def _greedy_no_eos(model, enc_states, enc_mask, prompts: list[list[int]], n_steps: int) -> list[list[int]]:
    """NeMo's GreedySequenceGenerator with EOS unreachable; generated ids per prompt (batched by prompt length)."""
    import torch

    from nemo.collections.asr.modules.transformer.transformer_generators import GreedySequenceGenerator

    tok = model.tokenizer
    head = model.log_softmax.mlp.layer0
    saved = head.bias[tok.eos_id].item()
    out: dict[int, list[int]] = {}
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    with torch.no_grad():
        head.bias[tok.eos_id] = -1e4
        try:
            for plen, idx in by_len.items():
                gen = GreedySequenceGenerator(
                    embedding=model.transf_decoder.embedding,
                    decoder=model.transf_decoder.decoder,
                    classifier=model.log_softmax,
                    max_sequence_length=min(plen + n_steps, model.transf_decoder.max_sequence_length),
                    bos=tok.bos_id,
                    pad=tok.pad_id,
                    eos=tok.eos_id,
                    max_delta_length=-1,
                )
                ids = torch.tensor([prompts[i] for i in idx], dtype=torch.long)
                res = gen(
                    decoder_input_ids=ids,
                    encoder_hidden_states=enc_states.expand(len(idx), -1, -1),
                    encoder_input_mask=enc_mask.expand(len(idx), -1),
                )
                res = res[0] if isinstance(res, tuple) else res
                for row, i in enumerate(idx):
                    out[i] = res[row, plen:].tolist()
        finally:
            head.bias[tok.eos_id] = saved
    return [out[i] for i in range(len(prompts))]


def calibrate(model, spec: dict, clip_inputs: dict, knobs: dict) -> dict:
    """Choose the EOS bias so that part of the greedy results end before the length cap, and judge the seed.

    Trajectories are first generated with EOS unreachable. The EOS bias only decides whether EOS wins a step, so
    with bias b each result is its trajectory's prefix up to the first step where EOS beats the best other token
    (or up to the cap). Every decision up to there must have a top-1/top-2 gap >= MIN_MARGIN, counting the EOS
    candidate; results must not be degenerate; outputs for one clip must differ between prompts.
    """
    import torch

    tok = model.tokenizer
    eos = tok.eos_id
    head = model.log_softmax.mlp.layer0
    prompt_names = list(spec["prompts"])
    prompt_ids = {k: _prompt_ids(model, v) for k, v in spec["prompts"].items()}
    per_clip = {}
    for clip, wave in clip_inputs.items():
        _, enc_states, enc_mask = _forward_b1(model, wave)
        per_clip[clip] = (enc_states, enc_mask)
    # a batch of every clip is padded to the longest one, whose B=1 padded encoder length is the same
    t_batch = max(e.shape[1] for e, _ in per_clip.values())
    trajs = []
    for clip, (enc_states, enc_mask) in per_clip.items():
        caps = {}
        for k, p in prompt_ids.items():
            c = _length_cap(model, enc_states.shape[1], len(p))["max_new_tokens"]
            cb = _length_cap(model, t_batch, len(p))["max_new_tokens"] if k in spec["batched_prompts"] else c
            caps[k] = (c, max(c, cb))
        n_steps = max(c[1] for c in caps.values())
        gens = _greedy_no_eos(model, enc_states, enc_mask, [prompt_ids[k] for k in prompt_names], n_steps)
        for k, y in zip(prompt_names, gens):
            ids = prompt_ids[k] + y
            with torch.no_grad():
                inp = torch.tensor([ids])
                h = model.transf_decoder(
                    input_ids=inp, decoder_mask=torch.ones_like(inp, dtype=enc_states.dtype),
                    encoder_embeddings=enc_states, encoder_mask=enc_mask,
                )
                logits = _np(h[0] @ head.weight.T + head.bias)
            rows = logits[len(prompt_ids[k]) - 1 : len(prompt_ids[k]) - 1 + len(y)]
            eos_raw = rows[:, eos] - head.bias[eos].item()
            others = rows.copy()
            others[:, eos] = -np.inf
            srt = np.sort(others, axis=-1)
            trajs.append(dict(clip=clip, prompt=k, caps=caps[k], gap=srt[:, -1] - eos_raw,
                              margin=srt[:, -1] - srt[:, -2], y=y))

    def outcome(b):
        ends, worst, bad = [], np.inf, []
        for t in trajs:
            hit = np.nonzero(t["gap"] < b)[0]
            end = int(hit[0]) if len(hit) else 10**9  # EOS chosen at step `end` -> `end` tokens
            for i, cap in enumerate(t["caps"]):
                n = min(end, cap)
                ended = end < cap
                steps = n + (1 if ended else 0)
                m = min(float(t["margin"][:n].min()) if n else np.inf, float(np.abs(t["gap"][:steps] - b).min()))
                worst = min(worst, m)
                if i == 0:
                    ends.append(ended)
                why = _degenerate(t["y"][:n], knobs["min_tokens"])
                if why:
                    bad.append((t["clip"], t["prompt"], ["b1", "batched"][i], why))
        return float(np.mean(ends)), worst, bad

    relevant = np.concatenate([t["gap"][: t["caps"][1]] for t in trajs])
    lo_q, hi_q = np.quantile(relevant, [0.001, 0.12])
    frac_lo, frac_hi = knobs["eos_frac_range"]
    best = None
    for b in np.linspace(lo_q, hi_q, 240):
        frac, worst, bad = outcome(float(b))
        score = (len(bad), not (frac_lo <= frac <= frac_hi), -worst)
        if best is None or score < best[0]:
            best = (score, float(b), frac, worst, bad)
    _, b, frac, worst, bad = best
    with torch.no_grad():
        head.bias[eos] = b
    prompt_dependence = {}
    for clip in per_clip:
        prompt_dependence[clip] = len({tuple(t["y"][:20]) for t in trajs if t["clip"] == clip})
    token_margin = min(float(t["margin"][: t["caps"][1]].min()) for t in trajs)
    return {
        "eos_bias": b,
        "eos_frac": frac,
        "min_margin": worst,
        "min_token_margin_full_trajectories": token_margin,
        "degenerate": bad,
        "distinct_prefixes_per_clip": prompt_dependence,
        "n_prompts": len(prompt_names),
        "ok": not bad and worst >= MIN_MARGIN and frac_lo <= frac <= frac_hi
        and min(prompt_dependence.values()) >= min(3, len(prompt_names)),
    }


# --------------------------------------------------------------------------------------------------------------
# Tokenizer references.


def tokenizer_reference(model, spec: dict) -> dict:
    tok = model.tokenizer
    is_agg = spec["tokenizer"] == "agg"
    ref = {
        "class": type(tok).__name__,
        "vocab_size": int(tok.vocab_size),
        "head_rows": int(model.log_softmax.mlp.layer0.weight.shape[0]),
        "bos_id": int(tok.bos_id),
        "eos_id": int(tok.eos_id),
        "pad_id": int(tok.pad_id),
        "nospeech_id": int(tok.nospeech_id),
    }
    n = tok.vocab_size
    ref["pieces"] = list(tok.ids_to_tokens(list(range(n))))
    if is_agg:
        ref["langs"] = list(tok.langs)
        ref["offsets"] = {k: int(v) for k, v in tok.token_id_offset.items()}
        ref["sub_vocab_sizes"] = {k: int(t.vocab_size) for k, t in tok.tokenizers_dict.items()}
        ref["special_tokens"] = {k: int(v) for k, v in tok.special_tokens.items()}
    else:
        ref["langs"] = spec["langs"]
        ref["special_tokens"] = {p: i for i, p in enumerate(ref["pieces"]) if p.startswith("<|") or p == "<pad>"}
        ref["add_dummy_prefix"] = _spm_add_dummy_prefix(tok)

    enc = []
    for lang, texts in TOKENIZER_SAMPLES.items():
        if lang not in spec["langs"]:
            continue
        for text in texts + LANG_TEXT[lang][:3]:
            ids = tok.text_to_ids(text, lang) if is_agg else tok.text_to_ids(text)
            enc.append({"lang": lang, "text": text, "ids": [int(i) for i in ids]})
    ref["text_to_ids"] = enc

    # ids_to_text on sequences mixing languages, specials and timestamp tokens
    sp = ref["special_tokens"]
    seqs = []
    en = next(e["ids"] for e in enc if e["lang"] == "en" and e["text"] == "Hello world.")
    seqs.append(en)
    seqs.append([sp["<|startoftranscript|>"]] + en + [sp["<|endoftext|>"]])
    if "<|0|>" in sp:
        seqs.append([sp["<|0|>"]] + en[:2] + [sp["<|3|>"], sp["<|4|>"]] + en[2:] + [sp["<|9|>"]])
    seqs.append([sp["<|nospeech|>"]])
    seqs.append([sp["<|pnc|>"]] + en + [sp["<|nopnc|>"]])
    other = [lang for lang in spec["langs"] if lang != "en"]
    if other:
        o = next(e["ids"] for e in enc if e["lang"] == other[0])
        seqs.append(en + o)
        seqs.append(o)
    seqs.append([])
    seqs.append(list(range(0, min(n, 40))))
    seqs.append(list(range(max(0, n - 30), n)))
    ref["ids_to_text"] = [{"ids": s, "text": tok.ids_to_text(s)} for s in seqs]

    # prompts built by NeMo's prompt formatter
    prompts = []
    if spec["prompt_format"] == "canary2":
        base = dict(decodercontext="", emotion="<|emo:undefined|>", source_lang="<|en|>", target_lang="<|en|>",
                    pnc="<|pnc|>", itn="<|noitn|>", timestamp="<|notimestamp|>", diarize="<|nodiarize|>")
        variants = [
            {},
            {"pnc": "<|nopnc|>"},
            {"source_lang": "<|de|>", "target_lang": "<|en|>"},
            {"source_lang": "<|en|>", "target_lang": "<|de|>", "itn": "<|itn|>", "diarize": "<|diarize|>"},
            {"timestamp": "<|timestamp|>", "emotion": "<|emo:neutral|>"},
            {"decodercontext": "hello world"},
            {"decodercontext": "Grüße aus München", "target_lang": "<|de|>"},
            {"decodercontext": "the quick brown fox", "source_lang": "<|de|>", "target_lang": "<|en|>"},
            {"pnc": "yes", "itn": "no", "timestamp": "no", "diarize": "no", "source_lang": "fr" if "fr" in
             spec["langs"] else "en", "target_lang": "en"},
        ]
        for v in variants:
            slots = dict(base, **v)
            if is_agg:
                slots["prompt_language"] = "spl_tokens"
            ids = model.prompt.encode_dialog([{"role": "user", "slots": slots}])["context_ids"].tolist()
            prompts.append({"role": "user", "slots": slots, "ids": ids})
        for ctx in ("", "hello world"):
            slots = {"decodercontext": ctx}
            if is_agg:
                slots["prompt_language"] = "spl_tokens"
            try:
                ids = model.prompt.encode_dialog([{"role": "user_partial", "slots": slots}])["context_ids"].tolist()
                prompts.append({"role": "user_partial", "slots": slots, "ids": ids})
            except Exception as e:  # NeMo 3.0: aggregate tokenizer cannot parse a partial prompt with context
                prompts.append({"role": "user_partial", "slots": slots, "error": f"{type(e).__name__}: {e}"})
    else:
        for src, task, tgt, pnc in (
            ("en", "asr", "en", "yes"),
            ("en", "asr", "en", "no"),
            ("de", "asr", "de", "yes"),
            ("en", "ast", "de", "yes"),
            ("de", "translate", "en", "no"),
            ("<|en|>", "<|transcribe|>", "<|en|>", "<|pnc|>"),
        ):
            slots = {"source_lang": src, "task": task, "target_lang": tgt, "pnc": pnc}
            try:
                ids = model.prompt.encode_dialog([{"role": "user", "slots": dict(slots)}])["context_ids"].tolist()
                prompts.append({"role": "user", "slots": slots, "ids": ids})
            except Exception as e:  # NeMo 3.0: all-special-token slots get no prompt_language -> assertion
                prompts.append({"role": "user", "slots": slots, "error": f"{type(e).__name__}: {e}"})
                slots = dict(slots, prompt_language="spl_tokens")
                ids = model.prompt.encode_dialog([{"role": "user", "slots": dict(slots)}])["context_ids"].tolist()
                prompts.append({"role": "user", "slots": slots, "ids": ids})
    ref["prompts"] = prompts
    ref["transcribe_prompts"] = {k: _prompt_ids(model, v) for k, v in spec["prompts"].items()}
    return ref


def _spm_add_dummy_prefix(tok) -> bool | None:
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb

        m = pb.ModelProto()
        m.ParseFromString(tok.tokenizer.serialized_model_proto())
        return bool(m.normalizer_spec.add_dummy_prefix)
    except Exception:  # protobuf module missing: not essential
        return None


# --------------------------------------------------------------------------------------------------------------
# One variant.


def _config_summary(model, seed: int) -> dict:
    c = model.cfg
    return {
        "prompt_format": c.prompt_format,
        "n_mels": int(c.preprocessor.features),
        "pad_to": int(c.preprocessor.pad_to),
        "encoder": {k: (list(v) if hasattr(v, "__len__") and not isinstance(v, str) else v) for k, v in (
            ("d_model", c.encoder.d_model), ("n_layers", c.encoder.n_layers), ("n_heads", c.encoder.n_heads),
            ("subsampling_conv_channels", c.encoder.subsampling_conv_channels),
            ("conv_kernel_size", c.encoder.conv_kernel_size), ("xscaling", c.encoder.xscaling),
            ("att_context_size", list(c.encoder.att_context_size)))},
        "decoder": {
            "hidden": int(c.transf_decoder.config_dict.hidden_size),
            "inner": int(c.transf_decoder.config_dict.inner_size),
            "layers": int(c.transf_decoder.config_dict.num_layers),
            "heads": int(c.transf_decoder.config_dict.num_attention_heads),
            "max_sequence_length": int(c.transf_decoder.config_dict.max_sequence_length),
        },
        "encoder_decoder_proj": not isinstance(model.encoder_decoder_proj, __import__("torch").nn.Identity),
        "vocab_size": int(model.tokenizer.vocab_size),
        "head_rows": int(model.log_softmax.mlp.layer0.weight.shape[0]),
        "seed": seed,
    }


def _decoding_summary(model) -> dict:
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(model.cfg.decoding, resolve=True)
    dec = model.decoding.decoding
    eff = {"strategy": cfg.get("strategy"), "class": type(dec).__name__}
    if hasattr(dec, "beam_search"):
        bs = dec.beam_search
        eff.update(beam_size=int(bs.beam_size), length_penalty=float(bs.len_pen),
                   max_delta_length=int(bs.max_delta_len), max_sequence_length=int(bs.max_seq_length))
    else:
        gs = dec.greedy_search
        eff.update(max_delta_length=int(gs.max_delta_len), max_sequence_length=int(gs.max_seq_length),
                   temperature=gs.temperature)
    return {"yaml": cfg, "effective": eff}


def build_variant(name: str, spec: dict, out: Path, audio_dir: Path, audio_manifest: dict, work: Path) -> dict:
    import torch
    from omegaconf import OmegaConf

    from nemo.collections.asr.models import EncDecMultiTaskModel

    t0 = time.time()
    for seen in _TRANSCRIBE_SEEN.values():
        seen.clear()
    vdir = out / name
    if vdir.exists():
        shutil.rmtree(vdir)
    vdir.mkdir(parents=True)
    tok_cfg = make_tokenizer_cfg(spec, work / name)

    clips = audio_manifest["clips"]
    nemo_wave = {c["name"]: np.load(out / "nemo_inputs" / f"{c['name']}.npy") for c in clips}
    # What each clip looks like at NeMo's input: 16 kHz mono files go in as they are; others go in as a float32
    # WAV of NeMo's own loading of the file (channel mean), so every reference uses that waveform.
    nemo_path = {}
    for c in clips:
        if c["sample_rate"] == 16000 and c["channels"] == 1:
            nemo_path[c["name"]] = audio_dir / c["file"]
        else:
            nemo_path[c["name"]] = out / "nemo_inputs" / f"{c['name']}.wav"
    names = [c["name"] for c in clips]
    paths = [nemo_path[k] for k in names]
    model_input = None  # the audio transcribe() feeds the model (captured on the first model built)

    # ---- build, shape, calibrate (in memory); retry seeds if ambiguous/degenerate
    knobs = dict(SHAPING, **spec.get("shaping", {}))
    tries = []

    def make(seed):
        reset_restore_state()
        torch.manual_seed(seed)
        m = EncDecMultiTaskModel(cfg=OmegaConf.create(make_model_cfg(spec, tok_cfg)))
        m.eval()
        shape_weights(m, seed, knobs)
        return m

    for attempt in range(knobs["max_seed_tries"]):
        seed = spec["seed"] + 1000 * attempt
        model = make(seed)
        if model_input is None:
            first = next(iter(spec["prompts"].values()))
            _, batches = _transcribe(model, paths, 1, first)
            model_input = {k: b["audio"][0, : int(b["audio_lens"][0])].copy() for k, b in zip(names, batches)}
        cal = calibrate(model, spec, model_input, knobs)
        cal["seed"] = seed
        tries.append(cal)
        distinct = sorted(set(cal["distinct_prefixes_per_clip"].values()))
        print(f"[oracle] {name}: {time.time() - t0:.1f}s seed {seed}: eos_frac {cal['eos_frac']:.2f} "
              f"min_margin {cal['min_margin']:.4g} degenerate {len(cal['degenerate'])} distinct {distinct} "
              f"ok={cal['ok']}", flush=True)
        if cal["ok"]:
            break
    else:  # nothing passed: take the least bad seed (the smoke tests will say what is wrong with it)
        seed = min(tries, key=lambda t: (len(t["degenerate"]), -t["min_margin"]))["seed"]
        print(f"[oracle] WARNING {name}: no seed passed all checks; using seed {seed}", flush=True)
        model = make(seed)
        calibrate(model, spec, model_input, knobs)
    nemo_file = vdir / "model.nemo"
    model.save_to(str(nemo_file))
    del model
    reset_restore_state()
    model = EncDecMultiTaskModel.restore_from(str(nemo_file), map_location="cpu")
    model.eval()
    reset_restore_state()
    t_built = time.time() - t0

    tok = model.tokenizer
    eos = int(tok.eos_id)
    arrays: dict[str, np.ndarray] = {}
    ref = {
        "variant": name,
        "model": "model.nemo",
        "config": _config_summary(model, seed),
        "decoding": _decoding_summary(model),
        "shaping": {"knobs": knobs, "tries": tries},
        "special_ids": {"bos": int(tok.bos_id), "eos": eos, "pad": int(tok.pad_id), "nospeech": int(tok.nospeech_id)},
    }

    # ---- features (plain, NeMo-loaded waveform, B=1) and encoder (NeMo-input waveform, B=1)
    clip_recs = []
    enc_cache = {}
    for c in clips:
        k = c["name"]
        w = nemo_wave[k]
        with torch.no_grad():
            f, fl = model.preprocessor(input_signal=torch.from_numpy(w)[None], length=torch.tensor([len(w)]))
        arrays[f"features/{k}"] = _np(f[0])
        arrays[f"features_len/{k}"] = np.array(int(fl[0]))
        enc_arrays, enc_states, enc_mask = _forward_b1(model, model_input[k])
        enc_cache[k] = (enc_states, enc_mask)
        padded = len(model_input[k]) != len(w)
        if padded:
            left = _find_offset(model_input[k], w)
            right = len(model_input[k]) - len(w) - left
            arrays[f"audio_padded1s/{k}"] = model_input[k]
            arrays[f"features_padded1s/{k}"] = enc_arrays["features"]
            arrays[f"features_padded1s_len/{k}"] = enc_arrays["features_len"]
        for an, av in enc_arrays.items():
            if an.startswith("features"):
                continue
            arrays[f"encoder/{k}/{an}"] = av
        clip_recs.append({
            "name": k,
            "lang": c["lang"],
            "kind": c["kind"],
            "file": f"audio/{c['file']}",
            "waveform": f"nemo_inputs/{k}.npy",
            "nemo_input_file": str(nemo_path[k].relative_to(out)),
            "encoder_input": f"audio_padded1s/{k}" if padded else "NeMo-loaded waveform",
            "pad_1s": {"left": left, "right": right} if padded else None,
            "features_len": int(fl[0]),
            "encoder_len": int(enc_arrays["length"]),
            "encoder_frames_padded": int(enc_arrays["output"].shape[0]),
        })
    ref["clips"] = clip_recs

    # ---- greedy via transcribe(), B=1, prompt matrix
    prompts = {}
    results = []
    tf_keep = {}
    for pname, kwargs in spec["prompts"].items():
        hyps, batches = _transcribe(model, paths, 1, kwargs)
        assert len(hyps) == len(names) == len(batches)
        p_ids = batches[0]["prompt"][0].tolist()
        assert all((b["prompt"] == batches[0]["prompt"]).all() for b in batches)
        built = _prompt_ids(model, kwargs)
        prompts[pname] = {"kwargs": kwargs, "ids": p_ids, "matches_prompt_formatter": built == p_ids}
        for k, hyp, b in zip(names, hyps, batches):
            rec = _hyp_record(hyp, tok)
            y = rec["y_sequence"]
            # what transcribe fed the model (checks the 1 s padding and the float WAV path)
            fed = b["audio"][0, : int(b["audio_lens"][0])]
            cap = _length_cap(model, b["enc_states"].shape[1], len(p_ids))
            ended = len(y) < cap["max_new_tokens"]
            enc_states, enc_mask = enc_cache[k]
            lp = _teacher_forced(model, enc_states, enc_mask, p_ids + y)
            chk = _check_tf(lp, len(p_ids), y, eos, ended)
            rec.update(
                clip=k, prompt=pname, prompt_ids=p_ids, n_tokens=len(y), ended_with_eos=ended, cap=cap,
                min_margin=chk["min_margin"], teacher_forced_argmax_matches=chk["argmax_matches"],
                encoder_states_match_b1=float(np.abs(b["enc_states"][0] - _np(enc_states[0])).max()),
                fed_audio_samples=int(len(fed)),
                fed_audio_equals_encoder_input=bool(len(fed) == len(model_input[k])
                                                    and np.array_equal(fed, model_input[k])),
                degenerate=_degenerate(y, knobs["min_tokens"]),
            )
            results.append(rec)
            tf_keep[(k, pname)] = (p_ids + y, lp)
    ref["prompts"] = prompts
    ref["greedy_b1"] = results

    # teacher-forced log-prob matrices for two prompts per clip: own-language ASR and one translation
    own = {}
    for c in clips:
        cand = [p for p in spec["prompts"] if p.startswith(f"asr_{c['lang']}_pnc") and "timestamps" not in p]
        own[c["name"]] = cand[0] if cand else next(iter(spec["prompts"]))
    ast = next(p for p in spec["prompts"] if p.startswith("ast_"))
    tf_index = []
    for k in names:
        for pname in dict.fromkeys([own[k], ast]):
            ids, lp = tf_keep[(k, pname)]
            arrays[f"decoder/{k}/{pname}/input_ids"] = np.array(ids, dtype=np.int64)
            arrays[f"decoder/{k}/{pname}/log_probs"] = lp.astype(np.float32)
            tf_index.append({"clip": k, "prompt": pname, "prompt_len": len(prompts[pname]["ids"])})
    ref["teacher_forced"] = tf_index

    # ---- batched: every clip in one batch (mixed lengths)
    batched = []
    for pname in spec["batched_prompts"]:
        kwargs = spec["prompts"][pname]
        hyps, batches = _transcribe(model, paths, len(paths), kwargs)
        assert len(batches) == 1
        b = batches[0]
        p_ids = prompts[pname]["ids"]
        cap = _length_cap(model, b["enc_states"].shape[1], b["prompt"].shape[1])
        items = []
        for i, (k, hyp) in enumerate(zip(names, hyps)):
            rec = _hyp_record(hyp, tok)
            y = rec["y_sequence"]
            ended = len(y) < cap["max_new_tokens"]
            es = torch.from_numpy(b["enc_states"][i : i + 1])
            em = (torch.arange(es.shape[1])[None] < int(b["enc_len"][i])).to(es.dtype)
            lp = _teacher_forced(model, es, em, p_ids + y)
            chk = _check_tf(lp, len(p_ids), y, eos, ended)
            b1 = next(r for r in results if r["clip"] == k and r["prompt"] == pname)
            n_valid = int(b["enc_len"][i])
            enc_diff = float(np.abs(b["enc_states"][i, :n_valid] - _np(enc_cache[k][0][0, :n_valid])).max())
            rec.update(clip=k, n_tokens=len(y), ended_with_eos=ended, min_margin=chk["min_margin"],
                       teacher_forced_argmax_matches=chk["argmax_matches"], equals_b1=y == b1["y_sequence"],
                       b1_prefix_equal=y[: len(b1["y_sequence"])] == b1["y_sequence"][: len(y)],
                       enc_states_max_abs_diff_vs_b1_valid=enc_diff)
            items.append(rec)
        if pname == spec["batched_prompts"][0]:
            arrays["batched/audio"] = b["audio"]
            arrays["batched/audio_len"] = b["audio_lens"]
            with torch.no_grad(), _TranscribePreprocessing(model):
                x = torch.from_numpy(b["audio"])
                xl = torch.from_numpy(b["audio_lens"])
                f, fl = model.preprocessor(input_signal=x, length=xl)
                e, el = model.encoder(audio_signal=f, length=fl)
            arrays["batched/features"] = _np(f)
            arrays["batched/features_len"] = _np(fl)
            arrays["batched/encoder_output"] = _np(e.transpose(1, 2))
            arrays["batched/encoder_len"] = _np(el)
            arrays["batched/enc_states"] = b["enc_states"]
        batched.append({"prompt": pname, "prompt_ids": p_ids, "batch_size": len(paths), "clips": names,
                        "cap": cap, "prompt_batch": b["prompt"].tolist(), "results": items})
    ref["greedy_batched"] = batched
    ref["transcribe_observed"] = {
        "config_pad_to": int(model.cfg.preprocessor.pad_to),
        "config_dither": float(model.cfg.preprocessor.dither),
        **{k: sorted(v) for k, v in _TRANSCRIBE_SEEN.items()},
        "short_clip_padding": "zero-padded to 16000 samples, both sides, left = ceil(pad / 2) (see pad_1s)",
    }

    # ---- summary
    margins = [r["min_margin"] for r in results if r["min_margin"] is not None]
    margins += [r["min_margin"] for bb in batched for r in bb["results"] if r["min_margin"] is not None]
    ref["summary"] = {
        "min_margin": float(min(margins)),
        "n_results_b1": len(results),
        "n_ended_with_eos_b1": int(sum(r["ended_with_eos"] for r in results)),
        "n_degenerate_b1": int(sum(r["degenerate"] is not None for r in results)),
        "token_count_range_b1": [min(r["n_tokens"] for r in results), max(r["n_tokens"] for r in results)],
        "all_teacher_forced_argmax_match": all(r["teacher_forced_argmax_matches"] for r in results)
        and all(r["teacher_forced_argmax_matches"] for bb in batched for r in bb["results"]),
        "batched_equals_b1": all(r["equals_b1"] for bb in batched for r in bb["results"]),
        "max_enc_diff_batched_vs_b1": max(r["enc_states_max_abs_diff_vs_b1_valid"] for bb in batched
                                          for r in bb["results"]),
        "all_prompts_match_formatter": all(p["matches_prompt_formatter"] for p in prompts.values()),
        "build_s": round(t_built, 2),
    }
    ref["tokenizer_file"] = "tokenizer.json"
    (vdir / "tokenizer.json").write_text(json.dumps(tokenizer_reference(model, spec), indent=1, ensure_ascii=False))
    ref["arrays"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()}
    np.savez(vdir / "reference.npz", **arrays)
    ref["summary"]["total_s"] = round(time.time() - t0, 2)
    (vdir / "reference.json").write_text(json.dumps(ref, indent=1, ensure_ascii=False))
    s = ref["summary"]
    print(f"[oracle] {name}: {s['total_s']} s, min margin {s['min_margin']:.4g}, eos {s['n_ended_with_eos_b1']}/"
          f"{s['n_results_b1']}, tokens {s['token_count_range_b1']}, degenerate {s['n_degenerate_b1']}, "
          f"batched==b1 {s['batched_equals_b1']}", flush=True)
    return ref


def _findings(ref: dict) -> dict:
    """NeMo behaviour observed in this variant's run (for people porting it)."""
    batched = [r for b in ref["greedy_batched"] for r in b["results"]]
    short = [c for c in ref["clips"] if c["pad_1s"]]
    obs = ref["transcribe_observed"]
    return {
        "batched_encoder_states_max_abs_diff_vs_b1_on_valid_frames": max(
            r["enc_states_max_abs_diff_vs_b1_valid"] for r in batched),
        "batched_tokens_equal_b1": sum(r["equals_b1"] for r in batched),
        "batched_tokens_extend_b1_past_its_cap": sum(r["b1_prefix_equal"] and not r["equals_b1"] for r in batched),
        "batched_tokens_differ_from_b1": sum(not r["b1_prefix_equal"] for r in batched),
        "transcribe_preprocessor_pad_to": obs["featurizer_pad_to"],
        "transcribe_preprocessor_dither": obs["featurizer_dither"],
        "config_pad_to": obs["config_pad_to"],
        "decoder_left_in_train_mode_by_transcribe": obs["decoder_training_after_transcribe"],
        "short_clip_padding": {c["name"]: c["pad_1s"] for c in short},
        "prompt_ids_equal_prompt_formatter": ref["summary"]["all_prompts_match_formatter"],
    }


def nemo_loader_waveform(path: Path, sample_rate: int = 16000) -> np.ndarray:
    """A file's samples as NeMo's transcribe() loads them (lhotse Recording, resampled), channel by channel
    (its channel_selector), averaged over the channels in float32."""
    from lhotse import Recording

    rec = Recording.from_file(str(path)).resample(sample_rate)
    channels = [rec.load_audio(channels=c)[0] for c in rec.channel_ids]
    return np.mean(np.stack(channels), axis=0, dtype=np.float32)


def _write_nemo_inputs(out: Path, audio_dir: Path, manifest: dict) -> None:
    import soundfile as sf

    d = out / "nemo_inputs"
    d.mkdir(parents=True, exist_ok=True)
    for c in manifest["clips"]:
        w = nemo_loader_waveform(audio_dir / c["file"])
        np.save(d / f"{c['name']}.npy", w)
        if c["sample_rate"] == 16000 and c["channels"] == 1:
            continue
        sf.write(d / f"{c['name']}.wav", w, 16000, subtype="FLOAT")
        back, sr = sf.read(d / f"{c['name']}.wav", dtype="float32")
        assert sr == 16000 and np.array_equal(back, w)


def build(out: Path, variants=None, force: bool = False) -> dict:
    out = Path(out)
    variants = list(variants or VARIANTS)
    if not force and is_fresh(out, variants):
        print(f"[oracle] {out} is up to date")
        return json.loads((out / "oracle.json").read_text())
    t0 = time.time()
    setup_torch()
    quiet_nemo()
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "oracle.json"
    if meta_path.exists():
        meta_path.unlink()  # invalid until the build completes
    audio_dir = out / "audio"
    manifest = audio_fixtures.build_corpus(audio_dir)
    _write_nemo_inputs(out, audio_dir, manifest)
    summaries, findings = {}, {}
    with tempfile.TemporaryDirectory(prefix="nemo_oracle_") as work:
        for name in variants:
            ref = build_variant(name, VARIANTS[name], out, audio_dir, manifest, Path(work))
            summaries[name] = ref["summary"]
            findings[name] = _findings(ref)
    meta = {
        "key": cache_key(),
        "variants": variants,
        "summaries": summaries,
        "findings": findings,
        "min_margin_threshold": MIN_MARGIN,
        "build_s": round(time.time() - t0, 1),
        "python": sys.version.split()[0],
    }
    meta_path.write_text(json.dumps(meta, indent=1))
    print(f"[oracle] done in {meta['build_s']} s -> {out}")
    return meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=oracle_dir_default())
    ap.add_argument("--variant", action="append", choices=list(VARIANTS), help="build only these (repeatable)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the cache key matches")
    ap.add_argument("--check", action="store_true", help="exit 0 if the oracle is fresh, 1 otherwise; build nothing")
    args = ap.parse_args(argv)
    if args.check:
        return 0 if is_fresh(args.out, args.variant) else 1
    build(args.out, args.variant, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
