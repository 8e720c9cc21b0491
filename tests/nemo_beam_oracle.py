"""NeMo beam-search references for the oracle's models (run with an interpreter that has NeMo).

    python tests/nemo_beam_oracle.py --oracle tests/.cache/oracle

For each variant below, restores ``<oracle>/<variant>/model.nemo``, switches NeMo to its AED beam search
(``change_decoding_strategy``) for every setting in ``SETTINGS``, and records the tokens NeMo's transcribe()
returns for every 16 kHz clip, one at a time and as one mixed-length batch. Written to
``<oracle>/<variant>/beam_reference.json`` with a key so an unchanged oracle is not recomputed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import nemo_oracle  # noqa: E402

VARIANTS = ("agg_canary2_proj", "agg_canary1")
# (beam size, length penalty alpha): alpha 0 is NeMo's effective default; alpha 1 exercises the penalty.
SETTINGS = ((2, 0.0), (4, 0.0), (4, 1.0))
PROMPTS = ("asr_en_pnc", "ast_en_de")
MAX_GENERATION_DELTA = 50
OUTPUT = "beam_reference.json"


def key(oracle: Path, variant: str) -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update((oracle / "oracle.json").read_bytes())
    h.update((oracle / variant / "reference.json").read_bytes())
    return h.hexdigest()[:16]


def is_fresh(oracle: Path) -> bool:
    for variant in VARIANTS:
        try:
            have = json.loads((oracle / variant / OUTPUT).read_text())["key"]
        except (OSError, ValueError, KeyError):
            return False
        if have != key(oracle, variant):
            return False
    return True


def build_variant(oracle: Path, variant: str) -> dict:
    from nemo.collections.asr.models import EncDecMultiTaskModel
    from omegaconf import OmegaConf

    ref = json.loads((oracle / variant / "reference.json").read_text())
    clips = [c for c in ref["clips"]]
    paths = [oracle / c["nemo_input_file"] for c in clips]
    nemo_oracle.reset_restore_state()
    model = EncDecMultiTaskModel.restore_from(str(oracle / variant / "model.nemo"), map_location="cpu")
    model.eval()
    nemo_oracle.reset_restore_state()
    runs = []
    for beam_size, alpha in SETTINGS:
        decoding = OmegaConf.create(
            {
                "strategy": "beam",
                "beam": {"beam_size": beam_size, "length_penalty": alpha, "max_generation_delta": MAX_GENERATION_DELTA},
            }
        )
        model.change_decoding_strategy(decoding)
        for prompt in PROMPTS:
            kwargs = ref["prompts"][prompt]["kwargs"]
            for batch_size in (1, len(paths)):
                hyps, _ = nemo_oracle._transcribe(model, paths, batch_size, kwargs)
                runs.append(
                    {
                        "beam_size": beam_size,
                        "length_penalty": alpha,
                        "max_generation_delta": MAX_GENERATION_DELTA,
                        "prompt": prompt,
                        "batch_size": batch_size,
                        "clips": [c["name"] for c in clips],
                        "tokens": [[int(t) for t in h.y_sequence.tolist()] for h in hyps],
                    }
                )
                print(f"[beam-oracle] {variant} beam {beam_size} alpha {alpha} {prompt} batch {batch_size}",
                      flush=True)
    return {"key": key(oracle, variant), "variant": variant, "runs": runs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--oracle", type=Path, default=nemo_oracle.oracle_dir_default())
    args = ap.parse_args(argv)
    nemo_oracle.quiet_nemo()
    nemo_oracle.setup_torch()
    for variant in VARIANTS:
        out = args.oracle / variant / OUTPUT
        try:
            if json.loads(out.read_text())["key"] == key(args.oracle, variant):
                continue
        except (OSError, ValueError, KeyError):
            pass
        data = build_variant(args.oracle, variant)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
