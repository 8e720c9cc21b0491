"""Canary-Qwen-2.5B (SALM) on this machine: mlx-canary side by side with NeMo's ``SALM.generate``, random weights.

The model has the released dimensions (``--llm-layers`` / ``--encoder-layers`` cut the depth for a reduced run on a
small machine; every other dimension stays real):

  LLM      Qwen3-1.7B: 28 layers, hidden 2048, FF 6144, 16 heads / 8 KV heads of 128, vocabulary 151936, tied head
  encoder  canary-1b-flash's FastConformer: 32 x 1024 (8 heads, FF 4096, kernel 9, dw_striding x8, 256 ch, 128 mels)
  adapter  IdentityConnector + Linear 1024 -> 2048; LoRA r=128, alpha=256 on q_proj / v_proj (merged by mlx-canary)

Each engine runs in its own process (its peak RSS is its own), on the same clips, batch 1, ``max_new_tokens`` tokens
per clip (random weights: EOS is practically never predicted, so both decode the full budget). Figures:
  start_to_first_s   process start -> first transcript (imports, model load, first clip), what a CLI user waits
  warm_s / tok_per_s later clips, model loaded: seconds per clip and generated tokens per second
  peak_rss_gb        the process's peak resident memory
  same_tokens        clips whose tokens equal NeMo's (float32: expected all; 8-bit: a quality figure)

  python benchmarks/salm_bench.py [--llm-layers 28] [--encoder-layers 32] [--max-new-tokens 32] [--clips 3]
      [--cache benchmarks/.cache/salm] [--json out.json]

Needs NeMo + peft (build, NeMo runs) and mlx-canary. Prints a table and writes JSON; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

START = time.perf_counter()
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_CACHE = HERE / ".cache" / "salm"
CLIPS = ["en_stella", "en_fox", "de_morgen", "fr_paris"]

QWEN3_1_7B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                  rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, initializer_range=0.02)
FLASH_ENCODER = dict(tokenizer="spe", langs=["en"], spe_vocab=96, specials=[], prompt_format="canary2", n_mels=128,
                     pad_to=0, enc_d=1024, enc_layers=32, enc_heads=8, sub_channels=256, xscaling=False, dec_d=1024,
                     dec_layers=1, dec_heads=8, max_seq=128,
                     decoding=dict(strategy="greedy", greedy=dict(max_generation_delta=-1, temperature=None,
                                                                  n_samples=1)))
LORA = dict(task_type="CAUSAL_LM", r=128, lora_alpha=256, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


def _paths():
    sys.path[:0] = [str(REPO / "tests"), str(REPO / "scripts")]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def build(cache: Path, llm_layers: int, encoder_layers: int) -> None:
    """The random-weight SALM checkpoint (NeMo's save_pretrained), in this process (NeMo)."""
    _paths()
    import torch

    import nemo_oracle
    import nemo_salm_oracle as oracle
    from nemo.collections.speechlm2.models import SALM
    from nemo_support import quiet_nemo

    quiet_nemo(python_warnings=True)
    torch.set_num_threads(os.cpu_count() or 1)
    cache.mkdir(parents=True, exist_ok=True)
    oracle.make_llm(cache / "llm", seed=7, dims=dict(QWEN3_1_7B, num_hidden_layers=llm_layers))
    asr = oracle.make_asr(cache / "work", dict(FLASH_ENCODER, enc_layers=encoder_layers))
    cfg = oracle.salm_config(cache / "llm", asr, enc_d=FLASH_ENCODER["enc_d"])
    cfg["lora"] = dict(LORA)
    model = SALM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    model.save_pretrained(str(cache / "checkpoint"))
    (cache / "build.json").write_text(json.dumps({"llm_layers": llm_layers, "encoder_layers": encoder_layers}))
    del nemo_oracle


def run_nemo(cache: Path, audio: list[str], max_new_tokens: int) -> dict:
    _paths()
    import torch

    from nemo.collections.speechlm2.models import SALM
    from nemo_support import quiet_nemo

    quiet_nemo(python_warnings=True)
    torch.set_num_threads(os.cpu_count() or 1)
    model = SALM.from_pretrained(str(cache / "checkpoint")).eval()
    load_s = time.perf_counter() - START
    results, times = [], []
    for path in audio:
        t0 = time.perf_counter()
        prompt = [[{"role": "user", "content": f"Transcribe the following: {model.audio_locator_tag}",
                    "audio": [path]}]]
        ids = model.generate(prompts=prompt, max_new_tokens=max_new_tokens)[0].tolist()
        times.append(time.perf_counter() - t0)
        results.append(ids[: ids.index(model.text_eos_id)] if model.text_eos_id in ids else ids)
        if len(results) == 1:
            first = time.perf_counter() - START
    return _figures("NeMo float32", load_s, first, times, results)


def run_mlx(model_dir: Path, audio: list[str], quantize) -> dict:
    import mlx_canary

    model = mlx_canary.load_model(model_dir, quantize=quantize)
    load_s = time.perf_counter() - START
    results, times = [], []
    for path in audio:
        t0 = time.perf_counter()
        results.append(model.transcribe(path).tokens)
        times.append(time.perf_counter() - t0)
        if len(results) == 1:
            first = time.perf_counter() - START
    return _figures(f"mlx-canary {'float32' if quantize is None else f'{quantize}-bit'}", load_s, first, times,
                    results)


def _figures(label, load_s, first, times, results) -> dict:
    warm = times[1:] or times
    tokens = sum(len(r) for r in results[1:] or results)
    return {"engine": label, "load_s": round(load_s, 2), "start_to_first_s": round(first, 2),
            "warm_s": round(sum(warm) / len(warm), 2), "tok_per_s": round(tokens / sum(warm), 2),
            "peak_rss_gb": round(peak_rss_gb(), 2), "tokens": results}


def _child(args: list[str], timeout: float) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--llm-layers", type=int, default=QWEN3_1_7B["num_hidden_layers"])
    ap.add_argument("--encoder-layers", type=int, default=FLASH_ENCODER["enc_layers"])
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--clips", type=int, default=3, help="clips per engine (the first one is the cold one)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--step", choices=["build", "nemo", "mlx"], help=argparse.SUPPRESS)
    ap.add_argument("--quantize", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--audio", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cache = args.cache.resolve() / f"llm{args.llm_layers}-enc{args.encoder_layers}"

    if args.step == "build":
        build(cache, args.llm_layers, args.encoder_layers)
        print(json.dumps({"built": str(cache)}))
        return 0
    if args.step == "nemo":
        print(json.dumps(run_nemo(cache, args.audio, args.max_new_tokens)))
        return 0
    if args.step == "mlx":
        model_dir = cache / "mlx-float32"
        config = json.loads((model_dir / "config.json").read_text())
        config["max_new_tokens"] = args.max_new_tokens  # the same budget NeMo's generate gets
        (model_dir / "config.json").write_text(json.dumps(config))
        print(json.dumps(run_mlx(model_dir, args.audio, args.quantize)))
        return 0

    _paths()
    import audio_fixtures
    import nemo_oracle

    audio_dir = nemo_oracle.oracle_dir_default().resolve() / "audio"
    if not (audio_dir / "audio.json").exists():
        audio_dir = cache.parent / "audio"
        audio_fixtures.build_corpus(audio_dir)
    files = {c["name"]: c["file"] for c in audio_fixtures.load_manifest(audio_dir)["clips"]}
    audio = [str(audio_dir / files[c]) for c in (CLIPS * 4)[: args.clips]]
    common = ["--cache", str(args.cache), "--llm-layers", str(args.llm_layers), "--encoder-layers",
              str(args.encoder_layers), "--max-new-tokens", str(args.max_new_tokens)]
    timings = {}
    if not (cache / "checkpoint" / "model.safetensors").exists():
        t0 = time.perf_counter()
        _child(common + ["--step", "build"], args.timeout)
        timings["build_s"] = round(time.perf_counter() - t0, 1)
    if not (cache / "mlx-float32" / "config.json").exists():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mlx_canary", "convert", str(cache / "checkpoint"),
                        str(cache / "mlx-float32"), "-q"], check=True, timeout=args.timeout)
        timings["convert_s"] = round(time.perf_counter() - t0, 1)
    rows = [_child(common + ["--step", "nemo", "--audio", *audio], args.timeout)]
    rows.append(_child(common + ["--step", "mlx", "--audio", *audio], args.timeout))
    rows.append(_child(common + ["--step", "mlx", "--quantize", "8", "--audio", *audio], args.timeout))
    reference = rows[0]["tokens"]
    for row in rows:
        row["same_tokens"] = f"{sum(a == b for a, b in zip(row['tokens'], reference))}/{len(reference)}"
    depth = f"LLM {args.llm_layers}/28 layers, encoder {args.encoder_layers}/32 layers"
    print(f"Canary-Qwen-2.5B dimensions ({depth}), random weights, {len(audio)} clips, batch 1, "
          f"{args.max_new_tokens} new tokens, {os.cpu_count()} CPUs")
    keys = ["engine", "load_s", "start_to_first_s", "warm_s", "tok_per_s", "peak_rss_gb", "same_tokens"]
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(str(row[k]) for k in keys))
    if args.json:
        args.json.write_text(json.dumps({"depth": depth, "timings": timings, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
