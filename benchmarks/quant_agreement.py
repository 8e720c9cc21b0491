"""Token agreement of quantized models with float32, on the trained demo model's held-out speech.

Random-weight models cannot measure this: their logits are sharpened so that greedy decoding is varied, and any
quantization noise flips them. The demo model (``mlx_canary/demo``) is trained, so its held-out set (espeak-ng
voices and sentences never seen in training, rebuilt here exactly as tests/test_demo_model.py does) gives a
meaningful figure. For every variant (float32, 8-bit, 4-bit; group sizes 32 and 64) and prompt (punctuation;
no punctuation + timestamps): the share of transcripts whose tokens equal float32's, token agreement
(1 - token edit distance / float32 tokens, over all transcripts), WER against the reference, and the size of the
weights on disk. Prints a markdown table and writes benchmarks/results/quant_agreement-<timestamp>.json.

    python benchmarks/quant_agreement.py
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

import mlx_canary  # noqa: E402
from mlx_canary.loading import DEMO_MODEL_DIR  # noqa: E402

VARIANTS = [(None, None), (8, 64), (8, 32), (4, 64), (4, 32)]


def load_recipe():
    spec = importlib.util.spec_from_file_location("_demo_recipe", REPO / "scripts" / "train_demo_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def edit_distance(a: list, b: list) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def main() -> int:
    recipe = load_recipe()
    ref = json.loads((DEMO_MODEL_DIR / "nemo_reference.json").read_text())
    voices = [recipe.Voice(v["lang"], v["voice"], v["variant"], v["speed"], v["pitch"]) for v in ref["voices"].values()]
    cache = REPO / "tests" / ".cache" / "demo_bank" / "quant"
    bank = recipe.build_bank(voices, cache)
    clips = [(c, recipe.compose(c["parts"], bank[c["voice"]])[0].astype(np.float32) / 32768.0) for c in ref["clips"]]

    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for bits, group in VARIANTS:
            name = "float32" if bits is None else f"q{bits} g{group}"
            # quantized as it loads (the same arithmetic as `mlx-canary convert --quantize`); its size is
            # that of the weights saved as `convert` stores them, in the float16 the demo ships
            model = mlx_canary.load_model(DEMO_MODEL_DIR, quantize=bits, group_size=group or 64)
            weights = Path(tmp) / f"{name}.safetensors"
            params = {k: (v.astype(mx.float16) if v.dtype == mx.float32 else v)
                      for k, v in tree_flatten(model.engine.net.parameters())}
            mx.save_safetensors(str(weights), params)
            size = weights.stat().st_size
            out = {}
            t0 = time.perf_counter()
            for clip, wave in clips:
                for pname, prompt in ref["prompts"].items():
                    r = model.transcribe(wave, source_lang=clip["lang"], pnc=prompt["pnc"],
                                         timestamps=prompt["timestamps"])
                    out[clip["name"], pname] = (r.tokens, r.text)
            seconds = time.perf_counter() - t0
            results[name] = dict(bits=bits, group_size=group, size_bytes=size, seconds=seconds, out=out)

    base = results["float32"]
    for name, res in results.items():
        same = dist = total = 0
        pairs = []
        for (cname, pname), (tokens, text) in res["out"].items():
            ref_tokens = base["out"][cname, pname][0]
            same += tokens == ref_tokens
            dist += edit_distance(tokens, ref_tokens)
            total += len(ref_tokens)
            clip = next(c for c in ref["clips"] if c["name"] == cname)
            pairs.append((clip["reference"]["pnc" if ref["prompts"][pname]["pnc"] else "nopnc"], text))
        n = len(res["out"])
        res.update(identical=same / n, token_agreement=1 - dist / total, wer=recipe.wer(pairs), transcripts=n)
        rows.append(f"| {name} | {res['size_bytes'] / 2**20:.2f} | {res['size_bytes'] / base['size_bytes'] * 100:.0f} % "
                    f"| {same}/{n} ({res['identical'] * 100:.1f} %) | {res['token_agreement'] * 100:.2f} % "
                    f"| {res['wer'] * 100:.2f} % |")

    print("Demo model (mlx_canary/demo), held-out set: "
          f"{len(clips)} clips x {len(ref['prompts'])} prompts, greedy. Sizes: weights saved in float16 (as the demo ships), quantized ones with float16 scales.\n")
    print("| variant | weights MiB | of float | transcripts = float32 | token agreement | WER |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = REPO / "benchmarks" / "results" / f"quant_agreement-{stamp}.json"
    path.parent.mkdir(exist_ok=True)
    for res in results.values():
        res["out"] = {f"{c}/{p}": tokens for (c, p), (tokens, _) in res["out"].items()}
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
