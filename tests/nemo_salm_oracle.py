"""NeMo parity oracle for the SALM family (Canary-Qwen): a tiny random-weight ``SALM`` built with NeMo's own classes,
and what NeMo's ``SALM.generate`` makes of the parity audio.

Run with an interpreter that has NeMo 3.0 (torch CPU) and ``peft``:

    python tests/nemo_salm_oracle.py --out tests/.cache/salm_oracle [--force]

What it builds (everything local, nothing downloaded):
  <out>/llm/                 a tiny Qwen3 as a Hugging Face directory (``transformers`` config + random weights) with a
                             byte-level BPE tokenizer trained here, Qwen's chat tokens and a chat template
  <out>/asr.nemo             a tiny Canary encoder-decoder (tests/nemo_oracle.py's builder), SALM's ``pretrained_asr``
  <out>/checkpoint/          ``SALM.save_pretrained``: config.json + model.safetensors, the published layout (LoRA
                             adapters stored apart, ``pretrained_llm`` naming <out>/llm)
  <out>/reference.json       ids, prompt, per-clip greedy results (batch 1 and one batch of every clip), margins,
                             the LLM-only mode (``llm.disable_adapter()``) answering a text prompt (and with the adapter)
  <out>/reference.npz        encoder/<clip> (T, d) FastConformer output, projected/<clip> (T, D) what replaces the
                             placeholder, logits/<clip> (n+1, V) teacher-forced scores from the last prompt position on

The references come from the checkpoint as NeMo reads it (``SALM.from_pretrained``), prompted as the model card shows
(``generate(prompts=[[{"role": "user", "content": "Transcribe the following: <tag>", "audio": [path]}]])``: NeMo's own
audio loading through lhotse, its qwen prompt formatter, left padding and Hugging Face greedy ``generate``).

Importing this module does not import NeMo or torch (conftest uses ``is_fresh``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

FORMAT_VERSION = 1
DEFAULT_OUT = HERE / ".cache" / "salm_oracle"
ENV_DIR = "MLX_CANARY_SALM_ORACLE_DIR"
CLIPS = ["en_fox", "en_stella", "de_morgen", "fr_paris", "en_short"]  # 16 kHz mono files of the speech corpus
TAG = "<|audioplaceholder|>"
USER_PROMPT = "Transcribe the following: " + TAG
MAX_NEW_TOKENS = 24
ASK_QUESTION = "Summarize the transcript in one sentence:"  # the LLM-only mode, about the first clip's transcript
MIN_MARGIN = 1e-3  # smallest top-1/top-2 logit gap accepted on every greedy step (else: next seed)

LLM = dict(vocab_size=384, hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, head_dim=32, max_position_embeddings=1024, rms_norm_eps=1e-6,
           rope_theta=1000000.0, tie_word_embeddings=True, initializer_range=0.2)
ASR = dict(tokenizer="spe", langs=["en", "de", "es", "fr"], spe_vocab=96, specials=[], prompt_format="canary2",
           n_mels=128, pad_to=0, enc_d=64, enc_layers=2, enc_heads=4, sub_channels=16, xscaling=False, dec_d=64,
           dec_layers=1, dec_heads=4, max_seq=128,
           decoding=dict(strategy="greedy", greedy=dict(max_generation_delta=-1, temperature=None, n_samples=1)))
LORA = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
EOS_GAIN = 3.0  # the EOS embedding row (tied: its output row too) scaled up, so that some clips end before the cap
LORA_B_STD = 0.2  # PEFT starts lora_B at zero (a no-op adapter); random values make the merge matter
SEEDS = [101 + 17 * k for k in range(8)]
TOKENIZER_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "Transcribe the following: speech into text, with punctuation and capitals.",
    "Summarize the transcript in one sentence. What is this about?",
    "Guten Morgen, wie geht es dir? Bonjour, je vais a Paris demain.",
]


def _versions() -> dict:
    out = {}
    for dist in ("nemo_toolkit", "torch", "transformers", "tokenizers", "peft", "lhotse"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def cache_key(with_versions: bool = True) -> dict:
    key = {"script_sha": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]}
    if with_versions:
        key["versions"] = _versions()
    return key


def oracle_dir_default() -> Path:
    return Path(os.environ.get(ENV_DIR) or DEFAULT_OUT)


def is_fresh(out, check_versions: bool = True) -> bool:
    out = Path(out)
    try:
        meta = json.loads((out / "oracle.json").read_text())
    except (OSError, ValueError):
        return False
    want = cache_key(check_versions)
    if any(meta.get("key", {}).get(k) != v for k, v in want.items()):
        return False
    return all((out / f).exists() for f in ("reference.json", "reference.npz", "checkpoint/model.safetensors",
                                            "checkpoint/config.json", "llm/config.json", "llm/tokenizer.json"))


def load_reference(out) -> tuple[dict, dict]:
    out = Path(out)
    meta = json.loads((out / "reference.json").read_text())
    with np.load(out / "reference.npz") as z:
        return meta, {k: z[k] for k in z.files}


# --------------------------------------------------------------------------------------------------------------
# NeMo side (torch / NeMo imported lazily).


def make_llm(llm_dir: Path, seed: int, dims: dict = LLM) -> None:
    """A Qwen3 Hugging Face directory of ``dims`` (tiny by default): BPE tokenizer trained here + random weights."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TOKENIZER_TEXT * 4, trainer)
    chat = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                     chat_template=chat)
    hf_tok.save_pretrained(llm_dir)
    assert len(hf_tok) < dims["vocab_size"] - 1

    torch.manual_seed(seed)
    cfg = Qwen3Config(**{k: v for k, v in dims.items() if k != "rope_theta"},
                      rope_parameters={"rope_type": "default", "rope_theta": dims["rope_theta"]},
                      eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id, bos_token_id=None)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1, so that a wrong norm weight would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
        model.model.embed_tokens.weight[hf_tok.eos_token_id] *= EOS_GAIN
    model.save_pretrained(llm_dir)


def make_asr(work: Path, spec: dict = ASR) -> Path:
    from omegaconf import OmegaConf

    import nemo_oracle
    from nemo.collections.asr.models import EncDecMultiTaskModel
    from nemo_support import reset_restore_state

    reset_restore_state()
    tok_cfg = nemo_oracle.make_tokenizer_cfg(spec, work / "asr_tok")
    model = EncDecMultiTaskModel(cfg=OmegaConf.create(nemo_oracle.make_model_cfg(spec, tok_cfg)))
    path = work / "asr.nemo"
    model.save_to(str(path))
    return path


def salm_config(llm_dir: Path, asr: Path, enc_d: int = ASR["enc_d"]) -> dict:
    return {
        "pretrained_llm": str(llm_dir),
        "pretrained_asr": str(asr),
        "pretrained_weights": True,
        "freeze_params": [],
        "prevent_freeze_params": [],
        "prompt_format": "qwen",
        "audio_locator_tag": TAG,
        "lora": dict(LORA),
        "perception": {
            "target": "nemo.collections.speechlm2.modules.perception.AudioPerceptionModule",
            "modality_adapter": {"_target_": "nemo.collections.speechlm2.modules.perception.IdentityConnector",
                                 "d_model": enc_d},
        },
    }


def build_checkpoint(out: Path, work: Path, seed: int) -> None:
    import torch

    from nemo.collections.speechlm2.models import SALM

    make_llm(out / "llm", seed)
    asr = make_asr(work)
    torch.manual_seed(seed + 1)
    model = SALM(salm_config(out / "llm", asr))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, LORA_B_STD)
    model.save_pretrained(str(out / "checkpoint"))


def _generate(model, paths: list[str], max_new_tokens: int) -> list[list[int]]:
    prompts = [[{"role": "user", "content": USER_PROMPT, "audio": [p]}] for p in paths]
    ids = model.generate(prompts=prompts, max_new_tokens=max_new_tokens)
    rows = []
    for row in ids.tolist():
        rows.append(row[: row.index(model.text_eos_id)] if model.text_eos_id in row else row)
    return rows


def references(model, paths: dict) -> tuple[dict, dict]:
    """Greedy results (batch 1 and batched) + encoder / projection / teacher-forced logits per clip."""
    import torch
    from lhotse import Recording

    from nemo.collections.common.prompts import PromptFormatter

    formatter = PromptFormatter.resolve(model.cfg.prompt_format)(model.tokenizer)
    prompt_ids = formatter.encode_dialog(turns=[{"role": "user", "content": USER_PROMPT}])["input_ids"].tolist()
    names = list(paths)
    single = {k: _generate(model, [paths[k]], MAX_NEW_TOKENS)[0] for k in names}
    batched = dict(zip(names, _generate(model, [paths[k] for k in names], MAX_NEW_TOKENS)))
    arrays, margins = {}, {}
    tag_id = model.audio_locator_tag_id
    for k in names:
        audio = torch.as_tensor(Recording.from_file(paths[k]).load_audio())  # (1, N), as generate loads it
        lens = torch.tensor([audio.shape[1]])
        with torch.no_grad():
            feats, feat_lens = model.perception.preprocessor(input_signal=audio, length=lens)
            enc, enc_len = model.perception.encoder(audio_signal=feats, length=feat_lens)
            projected, proj_len = model.perception(input_signal=audio, input_signal_length=lens)
            ids = torch.tensor(prompt_ids + single[k])
            pos = prompt_ids.index(tag_id)
            emb = model.embed_tokens(torch.where(ids == tag_id, 0, ids))
            seq = torch.cat([emb[:pos], projected[0, : int(proj_len[0])], emb[pos + 1 :]])[None]
            logits = model(seq)["logits"][0]
        first = seq.shape[1] - len(single[k]) - 1  # row predicting the first generated token
        tf = logits[first:].float().numpy()
        top2 = np.sort(tf, axis=-1)[:, -2:]
        assert (tf[: len(single[k])].argmax(-1) == np.array(single[k], dtype=np.int64)).all(), k
        margins[k] = float((top2[:, 1] - top2[:, 0])[: len(single[k]) + (len(single[k]) < MAX_NEW_TOKENS)].min())
        arrays[f"encoder/{k}"] = enc[0, :, : int(enc_len[0])].T.numpy()
        arrays[f"projected/{k}"] = projected[0, : int(proj_len[0])].numpy()
        arrays[f"logits/{k}"] = tf
    message = f"{ASK_QUESTION}\n\n{model.tokenizer.ids_to_text(single[names[0]])}"
    chat_ids = formatter.encode_dialog(turns=[{"role": "user", "content": message}])["input_ids"].tolist()
    ask = {}
    for mode in ("adapter_off", "adapter_on"):
        turns = [[{"role": "user", "content": message}]]
        if mode == "adapter_off":
            with model.llm.disable_adapter():
                out = model.generate(prompts=turns, max_new_tokens=MAX_NEW_TOKENS)[0].tolist()
        else:
            out = model.generate(prompts=turns, max_new_tokens=MAX_NEW_TOKENS)[0].tolist()
        assert out[: len(chat_ids)] == chat_ids  # text-only generate returns the prompt too
        out = out[len(chat_ids) :]
        ask[mode] = out[: out.index(model.text_eos_id)] if model.text_eos_id in out else out
    meta = {
        "ask": {"question": ASK_QUESTION, "message": message, "prompt_ids": chat_ids, **ask},
        "clips": names,
        "prompt_ids": prompt_ids,
        "user_prompt": USER_PROMPT,
        "audio_locator_tag": TAG,
        "audio_locator_tag_id": tag_id,
        "eos_id": model.text_eos_id,
        "pad_id": model.text_pad_id,
        "max_new_tokens": MAX_NEW_TOKENS,
        "batch1": single,
        "batched": batched,
        "margins": margins,
        "text": {k: model.tokenizer.ids_to_text(v) for k, v in single.items()},
    }
    return meta, arrays


def _acceptable(meta: dict) -> str | None:
    outs = list(meta["batch1"].values())
    if min(meta["margins"].values()) < MIN_MARGIN:
        return f"near-tied step (margin {min(meta['margins'].values()):.2e})"
    if len({tuple(o) for o in outs}) < len(outs) - 1:
        return "clips decode alike (the audio barely matters)"
    ended = sum(len(o) < MAX_NEW_TOKENS for o in outs)
    if not 0 < ended < len(outs):
        return f"{ended} of {len(outs)} clips end with EOS (want some, not all)"
    if meta["ask"]["adapter_off"] == meta["ask"]["adapter_on"]:
        return "the LLM-only answer does not depend on the adapter"
    if max(len(set(o)) for o in outs) < 4:
        return "degenerate (one token repeated)"
    return None


def build(out: Path, force: bool = False) -> dict:
    sys.path.insert(0, str(HERE.parent / "scripts"))
    import torch

    import audio_fixtures
    import nemo_oracle
    from nemo.collections.speechlm2.models import SALM
    from nemo_support import quiet_nemo

    if is_fresh(out) and not force:
        return json.loads((out / "oracle.json").read_text())
    nemo_oracle.setup_torch()
    quiet_nemo(python_warnings=True)
    t0 = time.time()
    audio_dir = nemo_oracle.oracle_dir_default().resolve() / "audio"
    if not (audio_dir / "audio.json").exists():
        audio_dir = out / "audio"
        audio_fixtures.build_corpus(audio_dir)
    manifest = audio_fixtures.load_manifest(audio_dir)
    files = {c["name"]: c["file"] for c in manifest["clips"]}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    paths = {k: str(out / "audio" / files[k]) for k in CLIPS}
    (out / "audio").mkdir()
    for k in CLIPS:
        shutil.copy(audio_dir / files[k], out / "audio" / files[k])
    tries = []
    for seed in SEEDS:
        for sub in ("llm", "checkpoint", "work"):
            shutil.rmtree(out / sub, ignore_errors=True)
        build_checkpoint(out, out / "work", seed)
        model = SALM.from_pretrained(str(out / "checkpoint")).eval()
        meta, arrays = references(model, paths)
        why = _acceptable(meta)
        tries.append({"seed": seed, "rejected": why})
        if why is None:
            break
    else:
        raise RuntimeError(f"no seed gave an unambiguous, varied model: {tries}")
    shutil.rmtree(out / "work", ignore_errors=True)
    meta.update(seed=seed, tries=tries, llm=LLM, asr={k: v for k, v in ASR.items() if k != "decoding"}, lora=LORA,
                audio_files={k: f"audio/{files[k]}" for k in CLIPS})
    (out / "reference.json").write_text(json.dumps(meta, indent=1))
    np.savez(out / "reference.npz", **arrays)
    info = {"key": cache_key(), "seconds": round(time.time() - t0, 1), "torch_threads": torch.get_num_threads()}
    (out / "oracle.json").write_text(json.dumps(info, indent=1))
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=oracle_dir_default())
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    print(json.dumps(build(args.out.resolve(), args.force), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
