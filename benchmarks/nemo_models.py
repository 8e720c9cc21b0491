"""Benchmark models: random-weight NeMo Canary checkpoints with the real dimensions, built and cached once.

Two models, shaped like the released ones (docs/canary-reference.md §1):

  180m   canary-180m-flash: encoder 17 x 512 (8 heads, FF 2048, conv kernel 9, dw_striding x8, 256 ch, 128 mels),
         decoder 4 x 1024 (8 heads, inner 4096, max_seq 1024), encoder_decoder_proj 512 -> 1024
  1b     canary-1b-flash:   encoder 32 x 1024 (8 heads, FF 4096, kernel 9, dw_striding x8, 256 ch, 128 mels,
         xscaling false), decoder 4 x 1024 (8 heads, inner 4096, max_seq 1024), no projection

Both use an aggregate CanaryTokenizer of the real size: spl_tokens 1152 pieces (900 timestamp tokens, 30
spltokens, 200 language tokens, the canary2 task/emotion/itn/... tokens) + en/de/es/fr SentencePiece BPE models of
1024 pieces each, trained here on generated pseudo-language text -> 5248 ids = 5248 head rows. Prompt format
canary2; decoding greedy with max_generation_delta 50.

Weights are NeMo's random initialisation, lightly shaped so that greedy decoding produces varied tokens with
wide top-1/top-2 margins (identical tokens across engines are then a meaningful check), and with EOS made
unreachable: every transcript runs to NeMo's length cap (min(1024, T_enc + 50) - prompt length), so both engines
always decode the same, known number of tokens.

Layout of the cache (default benchmarks/.cache/models):

  <cache>/<name>/model.nemo          the NeMo archive (1b: ~3.5 GB)
  <cache>/<name>/build.json          spec, cache key, build time, tokenizer sizes
  <cache>/<name>/mlx-float32/        converted with mlx_canary.convert (float32)
  <cache>/<name>/mlx-float32.json    conversion key + time

CLI (each step in its own process so NeMo's memory is returned to the OS):

  python benchmarks/nemo_models.py build   --model 1b [--cache DIR] [--force]   # needs NeMo
  python benchmarks/nemo_models.py convert --model 1b [--cache DIR] [--force]   # needs mlx_canary only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "scripts"))
from nemo_support import quiet_nemo, reset_restore_state  # noqa: E402
DEFAULT_CACHE = HERE / ".cache" / "models"
FORMAT_VERSION = 1

LANGS = ["en", "de", "es", "fr"]
LANG_VOCAB = 1024
SPL_VOCAB = 1152  # pieces of spl_tokens in the released flash models
N_TIMESTAMPS = 900
N_SPLTOKENS = 30
CANARY2_TASK_TOKENS = [
    "translate", "transcribe", "startofcontext",
    "emo:undefined", "emo:neutral", "emo:angry", "emo:happy", "emo:sad",
    "itn", "noitn", "timestamp", "notimestamp", "diarize", "nodiarize",
]

COMMON = dict(
    n_mels=128,
    sub_channels=256,
    enc_heads=8,
    conv_kernel=9,
    dec_d=1024,
    dec_layers=4,
    dec_heads=8,
    dec_inner=4096,
    max_seq=1024,
    max_generation_delta=50,
)
SPECS = {
    # xscaling of 180m-flash is not documented; NeMo's default (true) is used.
    "180m": dict(COMMON, name="canary-180m-flash (random weights)", enc_d=512, enc_layers=17, xscaling=True,
                 seed=180),
    "1b": dict(COMMON, name="canary-1b-flash (random weights)", enc_d=1024, enc_layers=32, xscaling=False,
               seed=1000),
}

# Weight shaping (see shape_weights).
EMB_LN_GAIN = 0.2
QK_SCALE = 2.0
LOGIT_SCALE = 12.0
BIAS_STD = 0.1


def model_dir(cache: Path, name: str) -> Path:
    return Path(cache) / name


def build_key(name: str) -> str:
    blob = json.dumps({"spec": SPECS[name], "format": FORMAT_VERSION,
                       "source": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def convert_key(name: str, dtype: str) -> str:
    """Changes when the NeMo model or the package's converter / config / tokenizer code changes."""
    h = hashlib.sha256(f"{build_key(name)}:{dtype}".encode())
    for mod in ("convert.py", "config.py", "nemo_archive.py", "tokenizer.py"):
        p = REPO / "mlx_canary" / mod
        if p.exists():
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def is_built(cache: Path, name: str) -> bool:
    d = model_dir(cache, name)
    try:
        meta = json.loads((d / "build.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("key") == build_key(name) and (d / "model.nemo").is_file()


def converted_dir(cache: Path, name: str, dtype: str = "float32", tag: str = "") -> Path:
    return model_dir(cache, name) / f"mlx-{dtype}{tag}"


def is_converted(cache: Path, name: str, dtype: str = "float32") -> bool:
    out = converted_dir(cache, name, dtype)
    try:
        meta = json.loads(out.with_suffix(".json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("key") == convert_key(name, dtype) and (out / "config.json").is_file()


# ------------------------------------------------------------------------------------------------------------
# Tokenizer training text: Zipf-distributed pseudo-words from per-language syllable inventories, so that BPE
# reaches 1024 pieces with language-like statistics (accents, capitals, digits, punctuation).

_SYLLABLES = {
    "en": dict(on=["", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "w", "th", "sh", "ch", "st",
                   "tr", "br", "wh", "gr", "pl", "y"],
               nu=["a", "e", "i", "o", "u", "ea", "ee", "oo", "ou", "ai", "ay", "ow", "y"],
               co=["", "", "n", "t", "s", "r", "d", "ll", "ng", "ck", "st", "nd", "ght", "rn", "ss"]),
    "de": dict(on=["", "b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "w", "z", "sch", "st", "sp",
                   "kr", "br", "pf", "gr", "fr", "tr"],
               nu=["a", "e", "i", "o", "u", "ä", "ö", "ü", "ei", "ie", "au", "eu", "äu"],
               co=["", "", "n", "r", "t", "s", "ch", "ng", "ß", "tz", "ck", "nd", "st", "rn", "lt"]),
    "es": dict(on=["", "b", "c", "d", "f", "g", "j", "l", "ll", "m", "n", "ñ", "p", "qu", "r", "rr", "s", "t", "v",
                   "z", "ch", "tr", "pr", "br", "gu"],
               nu=["a", "e", "i", "o", "u", "á", "é", "í", "ó", "ú", "ia", "ie", "ue", "io"],
               co=["", "", "", "n", "s", "r", "l", "d", "z", "ción", "mente"]),
    "fr": dict(on=["", "b", "c", "d", "f", "g", "j", "l", "m", "n", "p", "qu", "r", "s", "t", "v", "ch", "tr", "pr",
                   "br", "gr", "pl", "cl", "fl"],
               nu=["a", "e", "i", "o", "u", "é", "è", "ê", "à", "ou", "eau", "ai", "oi", "au", "eu", "ç"],
               co=["", "", "", "n", "r", "s", "t", "x", "nt", "ment", "tion", "ille", "que"]),
}


def generate_text(lang: str, n_lines: int = 30000, n_words: int = 12000, seed: int = 0) -> list[str]:
    rng = random.Random(f"{lang}:{seed}")
    s = _SYLLABLES[lang]
    lexicon: list[str] = []
    seen = set()
    while len(lexicon) < n_words:
        n_syl = rng.choices([1, 2, 3, 4], weights=[4, 5, 3, 1])[0]
        w = "".join(rng.choice(s["on"]) + rng.choice(s["nu"]) + rng.choice(s["co"]) for _ in range(n_syl))
        if w not in seen:
            seen.add(w)
            lexicon.append(w)
    weights = [1.0 / (i + 1) for i in range(len(lexicon))]
    lines = []
    for _ in range(n_lines):
        words = rng.choices(lexicon, weights=weights, k=rng.randint(4, 16))
        for i in range(len(words)):
            r = rng.random()
            if r < 0.04:
                words[i] = str(rng.randint(0, 2025))
            elif r < 0.10:
                words[i] = words[i].capitalize()
            elif r < 0.16:
                words[i] += rng.choice([",", ",", ";", ":"])
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice([".", ".", ".", "?", "!"]))
    return lines


def special_tokens() -> list[str]:
    """Requested spl tokens such that the special tokenizer has exactly SPL_VOCAB pieces."""
    fixed = CANARY2_TASK_TOKENS + [f"spltoken{i}" for i in range(N_SPLTOKENS)]
    # <unk> + 6 default tokens + requested + the final "▁" piece
    n_langs = SPL_VOCAB - 2 - 6 - len(fixed) - N_TIMESTAMPS
    langs = list(LANGS)
    letters = "abcdefghijklmnopqrstuvwxyz"
    for a in letters:
        for b in letters:
            if len(langs) >= n_langs:
                break
            if a + b not in langs:
                langs.append(a + b)
    return langs[:n_langs] + fixed + [str(i) for i in range(N_TIMESTAMPS)]


def build_tokenizers(work: Path) -> dict:
    import sentencepiece as spm

    from nemo.collections.common.tokenizers.canary_tokenizer import CanaryTokenizer
    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import create_spt_model

    spm.set_random_generator_seed(1)
    spl_dir = work / "spl_tokens"
    CanaryTokenizer.build_special_tokenizer(special_tokens(), spl_dir, force_rebuild=True)
    langs = {"spl_tokens": {"dir": str(spl_dir), "type": "bpe"}}
    for lang in LANGS:
        d = work / f"tok_{lang}"
        d.mkdir(parents=True, exist_ok=True)
        data = d / "train_text.txt"
        data.write_text("\n".join(generate_text(lang)) + "\n", encoding="utf-8")
        spm.set_random_generator_seed(1)
        create_spt_model(str(data), vocab_size=LANG_VOCAB, sample_size=-1, do_lower_case=False,
                         tokenizer_type="bpe", output_dir=str(d))
        langs[lang] = {"dir": str(d), "type": "bpe"}
    return {
        "dir": None,
        "type": "agg",
        "langs": langs,
        "custom_tokenizer": {"_target_": "nemo.collections.common.tokenizers.canary_tokenizer.CanaryTokenizer",
                             "tokenizer": None},
    }


def model_cfg(spec: dict, tokenizer_cfg: dict) -> dict:
    enc_d, dec_d = spec["enc_d"], spec["dec_d"]
    prompt_defaults = [
        {"role": "user", "slots": {"decodercontext": "", "emotion": "<|emo:undefined|>", "source_lang": "<|en|>",
                                   "target_lang": "<|en|>", "pnc": "<|pnc|>", "itn": "<|noitn|>",
                                   "timestamp": "<|notimestamp|>", "diarize": "<|nodiarize|>"}},
        {"role": "user_partial", "slots": {"decodercontext": ""}},
    ]
    return {
        "sample_rate": 16000,
        "label_smoothing": 0.0,
        "prompt_format": "canary2",
        "prompt_defaults": prompt_defaults,
        "model_defaults": {"asr_enc_hidden": enc_d, "lm_enc_hidden": dec_d, "lm_dec_hidden": dec_d},
        "tokenizer": tokenizer_cfg,
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "sample_rate": 16000, "normalize": "per_feature", "window_size": 0.025, "window_stride": 0.01,
            "window": "hann", "features": spec["n_mels"], "n_fft": 512, "log": True, "frame_splicing": 1,
            "dither": 1e-5, "pad_to": 0, "pad_value": 0.0,
        },
        "spec_augment": None,
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConformerEncoder",
            "feat_in": spec["n_mels"], "feat_out": -1, "n_layers": spec["enc_layers"], "d_model": enc_d,
            "subsampling": "dw_striding", "subsampling_factor": 8,
            "subsampling_conv_channels": spec["sub_channels"], "causal_downsampling": False,
            "ff_expansion_factor": 4, "self_attention_model": "rel_pos", "n_heads": spec["enc_heads"],
            "att_context_size": [-1, -1], "xscaling": spec["xscaling"], "untie_biases": True,
            "pos_emb_max_len": 5000, "conv_kernel_size": spec["conv_kernel"], "conv_norm_type": "batch_norm",
            "conv_context_size": None, "use_bias": True, "dropout": 0.0, "dropout_pre_encoder": 0.0,
            "dropout_emb": 0.0, "dropout_att": 0.0,
        },
        "transf_encoder": {
            "_target_": "nemo.collections.asr.modules.transformer.transformer_encoders.TransformerEncoder",
            "num_layers": 0, "hidden_size": dec_d, "inner_size": spec["dec_inner"], "num_attention_heads": 8,
            "ffn_dropout": 0.0, "attn_score_dropout": 0.0, "attn_layer_dropout": 0.0, "mask_future": False,
            "pre_ln": True, "pre_ln_final_layer_norm": True,
        },
        "transf_decoder": {
            "_target_": "nemo.collections.asr.modules.transformer.get_nemo_transformer",
            "model_name": None, "pretrained": False, "encoder": None, "pre_ln_final_layer_norm": True,
            "config_dict": {
                "max_sequence_length": spec["max_seq"], "num_token_types": 0, "embedding_dropout": 0.0,
                "learn_positional_encodings": False, "hidden_size": dec_d, "inner_size": spec["dec_inner"],
                "num_layers": spec["dec_layers"], "num_attention_heads": spec["dec_heads"], "ffn_dropout": 0.0,
                "attn_score_dropout": 0.0, "attn_layer_dropout": 0.0, "hidden_act": "relu", "pre_ln": True,
                "vocab_size": None,
            },
        },
        "head": {
            "_target_": "nemo.collections.asr.parts.submodules.token_classifier.TokenClassifier",
            "num_layers": 1, "activation": "relu", "log_softmax": True, "hidden_size": dec_d, "num_classes": None,
            "dropout": 0.0, "use_transformer_init": True,
        },
        # NeMo reads greedy.temperature / greedy.n_samples unguarded: the block must carry them.
        "decoding": {"strategy": "greedy_batch",
                     "greedy": {"max_generation_delta": spec["max_generation_delta"], "temperature": None,
                                "n_samples": 1}},
        "loss": {"_target_": "nemo.collections.common.losses.smoothed_cross_entropy.SmoothedCrossEntropyLoss",
                 "label_smoothing": 0.0, "pad_id": None},
    }


def shape_weights(model, seed: int) -> None:
    """Random init -> decodes varied tokens with wide margins; EOS/pad/padding rows never win.

    Non-trivial biases, LayerNorm gains and BatchNorm statistics; tied embedding rows centred and the embedding
    LayerNorm shrunk (otherwise the current token wins the tied output projection at every step); decoder q/k
    scaled up (sharper, input-dependent attention); final LayerNorm gain = logit scale (top-1/top-2 gaps far
    above float32 rounding).
    """
    import torch

    g = torch.Generator().manual_seed(seed)

    def randn(shape, std):
        return torch.randn(shape, generator=g) * std

    tok = model.tokenizer
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, (torch.nn.LayerNorm, torch.nn.BatchNorm1d)):
                mod.weight.copy_(1.0 + randn(mod.weight.shape, 0.1))
                mod.bias.copy_(randn(mod.bias.shape, BIAS_STD))
                if isinstance(mod, torch.nn.BatchNorm1d):
                    mod.running_mean.copy_(randn(mod.running_mean.shape, 0.2))
                    mod.running_var.copy_(0.5 + torch.rand(mod.running_var.shape, generator=g) * 1.5)
            elif isinstance(mod, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)) and mod.bias is not None:
                if not name.startswith("log_softmax"):
                    mod.bias.copy_(randn(mod.bias.shape, BIAS_STD))
        for name, p in model.encoder.named_parameters():
            if name.endswith(("pos_bias_u", "pos_bias_v")):
                p.copy_(randn(p.shape, 0.3))
        dec = model.transf_decoder
        emb = dec.embedding.token_embedding.weight  # tied with the head
        emb.sub_(emb[: tok.vocab_size].mean(dim=0, keepdim=True))
        dec.embedding.layer_norm.weight.mul_(EMB_LN_GAIN)
        dec.embedding.layer_norm.bias.mul_(EMB_LN_GAIN)
        for layer in dec.decoder.layers:
            for att in (layer.first_sub_layer, layer.second_sub_layer):
                att.query_net.weight.mul_(QK_SCALE)
                att.key_net.weight.mul_(QK_SCALE)
        fln = dec.decoder.final_layer_norm
        fln.weight.copy_(LOGIT_SCALE * (1.0 + randn(fln.weight.shape, 0.1)))
        head = model.log_softmax.mlp.layer0
        bias = randn(head.bias.shape, 0.5)
        bias[tok.vocab_size:] = -60.0
        for i in (tok.pad_id, tok.eos_id):
            bias[i] = -60.0  # EOS unreachable: every run decodes to the length cap
        head.bias.copy_(bias)


def build(name: str, cache: Path = DEFAULT_CACHE, force: bool = False) -> dict:
    """Build (or reuse) the NeMo archive of model `name`; run in a process of its own."""
    d = model_dir(cache, name)
    if not force and is_built(cache, name):
        return json.loads((d / "build.json").read_text())
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    import torch
    from omegaconf import OmegaConf

    quiet_nemo(python_warnings=True)
    from nemo.collections.asr.models import EncDecMultiTaskModel

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # bench.py sets it to --threads
    spec = SPECS[name]
    t0 = time.time()
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="canary_bench_") as work:
        tok_cfg = build_tokenizers(Path(work))
        t_tok = time.time() - t0
        reset_restore_state()
        torch.manual_seed(spec["seed"])
        model = EncDecMultiTaskModel(cfg=OmegaConf.create(model_cfg(spec, tok_cfg)))
        model.eval()
        shape_weights(model, spec["seed"] + 7)
        tok = model.tokenizer
        info = {
            "vocab_size": int(tok.vocab_size),
            "sub_vocab_sizes": {k: int(t.vocab_size) for k, t in tok.tokenizers_dict.items()},
            "head_rows": int(model.log_softmax.mlp.layer0.weight.shape[0]),
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "special_ids": {"bos": int(tok.bos_id), "eos": int(tok.eos_id), "pad": int(tok.pad_id)},
        }
        model.save_to(str(d / "model.nemo"))
        del model
        reset_restore_state()
    meta = {
        "key": build_key(name),
        "spec": spec,
        "tokenizer_s": round(t_tok, 1),
        "build_s": round(time.time() - t0, 1),
        "nemo_size_bytes": (d / "model.nemo").stat().st_size,
        **info,
    }
    (d / "build.json").write_text(json.dumps(meta, indent=1))
    return meta


def convert_model(name: str, cache: Path = DEFAULT_CACHE, dtype: str = "float32", force: bool = False,
                  **convert_kwargs) -> dict:
    """Convert the cached archive with mlx_canary.convert (run in a process without torch)."""
    out = converted_dir(cache, name, dtype, convert_kwargs.pop("tag", ""))
    meta_path = out.with_suffix(".json")
    key = convert_key(name, dtype) + (json.dumps(convert_kwargs, sort_keys=True) if convert_kwargs else "")
    if not force:
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("key") == key and (out / "config.json").is_file():
                return meta
        except (OSError, json.JSONDecodeError):
            pass
    sys.path.insert(0, str(REPO))
    from mlx_canary.convert import convert

    t0 = time.time()
    summary = convert(model_dir(cache, name) / "model.nemo", out, dtype=dtype, overwrite=True,
                      progress=lambda s: None, **convert_kwargs)
    meta = {"key": key, "convert_s": round(time.time() - t0, 1), "dir": str(out),
            "num_parameters": summary.num_parameters, "size_bytes": summary.size_bytes,
            "options": convert_kwargs}
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=["build", "convert"])
    ap.add_argument("--model", required=True, choices=list(SPECS))
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quantize-bits", type=int, default=None,
                    help="convert with quantize=<bits> (only if mlx_canary.convert.convert accepts it)")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    if args.step == "build":
        meta = build(args.model, args.cache, args.force)
    else:
        kw = {}
        if args.quantize_bits:
            kw = {"quantize": args.quantize_bits, "tag": f"-q{args.quantize_bits}"}
        meta = convert_model(args.model, args.cache, args.dtype, args.force, **kw)
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
