"""The speech-LLM family (NeMo speechlm2 ``SALM``: canary-qwen-2.5b) behind the ``engine.Engine`` seam.

``SALMNet`` is the network: log-mel front end -> FastConformer (``conformer.py``, as in Canary) -> linear projection
to the LLM width -> a decoder-only LLM from ``mlx-lm`` (Qwen3 for canary-qwen), fed input embeddings. ``SALMEngine``
turns the pipeline's requests into NeMo's ``SALM.generate`` steps: a chat prompt whose audio placeholder token is
replaced by the projected audio frames, rows left-padded to one length (NeMo's ``replace_placeholders_and_build_
targets``) with their positions counted from each row's first real token (Hugging Face ``generate``), then greedy
decoding with a key/value cache until EOS or ``max_new_tokens``.

What the family cannot do (translation, timestamps, language identification, beam search) is refused by ``prompt``
and ``decode_options`` with ``UnsupportedOption``.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import SALMConfig
from .conformer import ConformerEncoder
from .engine import Capabilities, Encoded, Framing
from .errors import CanaryError, UnsupportedOption
from .model import Preprocessor
from .options import Task, TranscribeOptions

TOKENIZER_FILE = "tokenizer.json"
ADAPTER_FILE = "adapter.safetensors"  # the LoRA factors kept apart at conversion (the LLM-only mode subtracts them)
LANGUAGE = "en"  # canary-qwen-2.5b reads and writes English only

# NeMo's prompt formats (nemo/collections/common/prompts): the user turn, then the assistant's opening.
PROMPT_FORMATS = {
    "qwen": ("<|im_start|>user\n{message}<|im_end|>\n", "<|im_start|>assistant\n"),
}


def llm_class(llm_config: dict):
    """mlx-lm's (Model, ModelArgs) for the LLM's Hugging Face ``model_type``."""
    model_type = llm_config.get("model_type")
    try:
        module = importlib.import_module(f"mlx_lm.models.{model_type}")
    except ImportError:
        raise CanaryError(f"the LLM type {model_type!r} is not supported by mlx-lm") from None
    return module.Model, module.ModelArgs


class SALMNet(nn.Module):
    """Preprocessor buffers + FastConformer + projection + LLM; parameter names are the converter's contract."""

    def __init__(self, config: SALMConfig):
        super().__init__()
        self.config = config
        self.preprocessor = Preprocessor(config)
        self.encoder = ConformerEncoder(config.encoder)
        self.proj = nn.Linear(config.encoder.d_model, config.hidden_size)
        model_cls, args_cls = llm_class(config.llm)
        self.llm = model_cls(args_cls.from_dict(config.llm))

        self.adapter: Optional[Adapter] = None

    @property
    def dtype(self):
        return self.proj.bias.dtype

    def attach_adapter(self, factors: dict, scale: float) -> None:
        """The merged LoRA's factors (``<layer>.lora_a`` / ``.lora_b``), for running the LLM without it."""
        self.adapter = Adapter(factors, scale)

    @contextlib.contextmanager
    def adapter_disabled(self):
        """The LLM as it was before fine-tuning (NeMo's ``llm.disable_adapter()``): each adapted layer computes
        W x - scale * B (A x), with W the merged weight, for the duration of the block."""
        if self.adapter is None:
            raise UnsupportedOption("this model directory has no adapter.safetensors (convert the checkpoint "
                                    "again): the LLM-only mode needs the LoRA factors")
        swapped = []
        for layer in self.adapter.layers:
            parent, name = _parent(self, layer)
            base = getattr(parent, name)
            setattr(parent, name, WithoutAdapter(base, self.adapter.factors[f"{layer}.lora_a"],
                                                 self.adapter.factors[f"{layer}.lora_b"], self.adapter.scale))
            swapped.append((parent, name, base))
        try:
            yield
        finally:
            for parent, name, base in swapped:
                setattr(parent, name, base)

    def embed(self, ids: mx.array) -> mx.array:
        return self.llm.model.embed_tokens(ids)

    def audio_embeddings(self, audio: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """(B, N) samples -> FastConformer states (B, T, d), projected (B, T, D), valid lengths (B,)."""
        features, frame_lengths = self.preprocessor(audio, lengths)
        states, enc_lengths = self.encoder(features.astype(self.dtype), frame_lengths)
        return states, self.proj(states), enc_lengths

    def logits(self, embeddings: mx.array, cache) -> mx.array:
        """Scores (B, V) of the token after the last of ``embeddings`` (B, L, D), which join ``cache``."""
        return self.llm(None, cache=cache, input_embeddings=embeddings)[:, -1].astype(mx.float32)


@dataclass(frozen=True)
class Adapter:
    """LoRA factors by layer path (a plain object, so that they stay out of the network's parameter tree)."""

    factors: dict
    scale: float

    @property
    def layers(self) -> list[str]:
        return sorted({k.rsplit(".", 1)[0] for k in self.factors})


class WithoutAdapter(nn.Module):
    """A merged LoRA layer with its low-rank update taken out again: base(x) - scale * (x A^T) B^T."""

    def __init__(self, base: nn.Module, lora_a: mx.array, lora_b: mx.array, scale: float):
        super().__init__()
        self.base, self.lora_a, self.lora_b, self.scale = base, lora_a, lora_b, scale

    def __call__(self, x: mx.array) -> mx.array:
        update = (x.astype(mx.float32) @ self.lora_a.T) @ self.lora_b.T
        return self.base(x) - (self.scale * update).astype(x.dtype)


def _parent(root: nn.Module, path: str):
    *parents, name = path.split(".")
    node = root
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else getattr(node, part)
    return node, name


class SALMTokenizer:
    """The LLM's tokenizer (Hugging Face ``tokenizers``) with the audio placeholder token, as NeMo's AutoTokenizer."""

    languages = (LANGUAGE,)

    def __init__(self, path: Path, eos_id: int, pad_id: int):
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on a damaged file
            raise CanaryError(f"cannot read the tokenizer {path}: {err}") from None
        self.eos_id = eos_id
        self.pad_id = pad_id

    def encode(self, text: str, lang: Optional[str] = None) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    decode_text = decode  # special tokens are already left out of the text

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def is_timestamp(self, token: int) -> bool:
        return False

    def resolve_language(self, lang: str) -> str:
        if isinstance(lang, str) and lang.strip().strip("<|>") == LANGUAGE:
            return LANGUAGE
        raise UnsupportedOption(f"Unsupported language {lang!r}. This model supports: {LANGUAGE}.")


@dataclass(frozen=True)
class GenerateOptions:
    max_new_tokens: int
    eos_id: int


class SALMEngine:
    """A loaded speech-LLM: network, tokenizer and configuration."""

    default_chunk_seconds = None  # NeMo's 30-40 s plan for long inputs
    chunk_merge_by_time = False  # no timestamps: chunks are joined by NeMo's token merge

    def __init__(self, net: SALMNet, tokenizer: SALMTokenizer, config: SALMConfig, name: str = "salm"):
        self.net = net
        self.tokenizer = tokenizer
        self.config = config
        self.name = name

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(languages=(LANGUAGE,), timestamps=False, translation=False, language_id=False,
                            default_source_lang=LANGUAGE, chat=True)

    @property
    def framing(self) -> Framing:
        p = self.config.preprocessor
        # NeMo's SALM.generate encodes the audio as it is: no minimum duration.
        return Framing(sample_rate=p.sample_rate, hop_length=p.hop_length,
                       subsampling_factor=self.config.encoder.subsampling_factor, min_samples=0)

    # -- prompts ----------------------------------------------------------------------------------------------

    def prompt(self, task: Task) -> list[int]:
        self.tokenizer.resolve_language(task.source_lang)
        if task.target_lang != task.source_lang:
            raise UnsupportedOption(f"{self.name} transcribes English speech only; it does not translate")
        if task.timestamps:
            raise UnsupportedOption(f"{self.name} does not predict timestamps")
        if not task.pnc:
            raise UnsupportedOption(f"{self.name} always writes punctuation and capitals; it has no no-PnC mode")
        return self.chat_prompt(self.config.user_prompt + self.config.audio_locator_tag)

    def chat_prompt(self, message: str) -> list[int]:
        """Ids of one user turn and the assistant's opening in the model's prompt format (NeMo's formatter)."""
        user, assistant = PROMPT_FORMATS[self.config.prompt_format]
        # Tokenized as NeMo's formatter does: the turn, then the inference prefix.
        return self.tokenizer.encode(user.format(message=message)) + self.tokenizer.encode(assistant)

    def language_id_prompt(self) -> list[int]:
        raise UnsupportedOption(f"{self.name} knows English only: there is no language to identify")

    def identify_languages(self, encoded: Encoded) -> list[Optional[str]]:
        raise UnsupportedOption(f"{self.name} knows English only: there is no language to identify")

    # -- decoding ---------------------------------------------------------------------------------------------

    def decode_options(self, options: TranscribeOptions) -> GenerateOptions:
        if options.beam_size is not None and options.beam_size > 1:
            raise UnsupportedOption(f"{self.name} decodes greedily (as NeMo's SALM.generate); beam search is not "
                                    "available for it")
        return GenerateOptions(max_new_tokens=self.config.max_new_tokens, eos_id=self.config.eos_id)

    def encode(self, waves: Sequence[np.ndarray], pad_to: Optional[int] = None) -> Encoded:
        """Right-pad ``waves`` into one batch (as lhotse collates them) and run front end, encoder, projection."""
        longest = max([len(w) for w in waves] + [pad_to or 0, 1])
        batch = np.zeros((len(waves), longest), dtype=np.float32)
        for row, w in enumerate(waves):
            batch[row, : len(w)] = w
        lengths = mx.array([len(w) for w in waves], dtype=mx.int32)
        _, projected, enc_lengths = self.net.audio_embeddings(mx.array(batch), lengths)
        return Encoded(projected, enc_lengths, enc_lengths)

    def decode(self, encoded: Encoded, prompt: list[int], options: GenerateOptions) -> list[list[int]]:
        embeddings, left_padding = self.prompt_embeddings(encoded, prompt)
        return greedy_generate(self.net, embeddings, left_padding, options)

    def prompt_embeddings(self, encoded: Encoded, prompt: list[int]) -> tuple[mx.array, list[int]]:
        """(B, L, D) prompt embeddings with each row's audio frames in place of the placeholder, left-padded with
        zeros to the longest row, and each row's padding."""
        tag = self.config.audio_locator_id
        if prompt.count(tag) != 1:
            raise CanaryError("the prompt must hold the audio placeholder exactly once")
        at = prompt.index(tag)
        text = self.net.embed(mx.array(prompt, dtype=mx.int32)).astype(self.net.dtype)
        lengths = [int(n) for n in np.array(encoded.lengths)]
        longest = max(lengths)
        rows = []
        for row, n in enumerate(lengths):
            pad = mx.zeros((longest - n, text.shape[-1]), dtype=text.dtype)
            rows.append(mx.concatenate([pad, text[:at], encoded.states[row, :n].astype(text.dtype), text[at + 1 :]]))
        return mx.stack(rows), [longest - n for n in lengths]

    def chat(self, message: str, adapter: bool = False, max_new_tokens: Optional[int] = None) -> list[int]:
        """Greedy answer ids (EOS excluded) to a text-only user turn; ``adapter=False`` is NeMo's LLM-only mode
        (``with model.llm.disable_adapter(): model.generate(prompts=[[{"role": "user", "content": message}]])``)."""
        ids = self.chat_prompt(message)
        embeddings = self.net.embed(mx.array([ids], dtype=mx.int32)).astype(self.net.dtype)
        options = GenerateOptions(max_new_tokens or self.config.max_new_tokens, self.config.eos_id)
        if adapter:
            return greedy_generate(self.net, embeddings, [0], options)[0]
        with self.net.adapter_disabled():
            return greedy_generate(self.net, embeddings, [0], options)[0]

    def align(self, wave, text: str, level: str = "words"):
        raise UnsupportedOption(f"{self.name} has no aligner: it cannot force-align a text")

    def align_chunk(self, wave, tokens: list[int], task: Task) -> list[dict]:
        raise UnsupportedOption(f"{self.name} has no aligner: it cannot force-align a text")

    def read_tokens(self, tokens: list[int], task: Task, wave=None) -> tuple[str, list, list]:
        return self.tokenizer.decode(tokens).strip(), [], []


def greedy_generate(net: SALMNet, embeddings: mx.array, left_padding: list[int],
                    options: GenerateOptions) -> list[list[int]]:
    """Greedy tokens per row (EOS excluded) after the left-padded prompt ``embeddings`` (B, L, D).

    Each row's positions start at its first real frame and its padding is masked out (mlx-lm's ``BatchKVCache``),
    so a row decodes as it would alone. Rows that reach EOS stop; the loop ends when all have, or after
    ``max_new_tokens``.
    """
    from mlx_lm.models.cache import BatchKVCache

    batch = embeddings.shape[0]
    cache = [BatchKVCache(left_padding) for _ in net.llm.layers]
    scores = net.logits(embeddings, cache)
    out: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    for step in range(options.max_new_tokens):
        tokens = mx.argmax(scores, axis=-1)
        for row, token in enumerate(tokens.tolist()):
            if done[row]:
                continue
            if token == options.eos_id:
                done[row] = True
            else:
                out[row].append(int(token))
        if all(done) or step + 1 == options.max_new_tokens:
            break
        scores = net.logits(net.embed(tokens[:, None]).astype(net.dtype), cache)
    return out
