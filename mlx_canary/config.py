"""Model configuration: the dataclasses read from a converted model's ``config.json``.

One ``ModelConfig`` object flows through the engine; each module takes the part it needs. The converter
(``convert.py``) derives every value from the NeMo ``model_config.yaml`` and tensor shapes; defaults here are
NeMo's class defaults and only matter for hand-written configs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


@dataclass
class PreprocessorConfig:
    sample_rate: int = 16000
    n_mels: int = 128
    n_fft: int = 512
    win_length: int = 400  # samples
    hop_length: int = 160  # samples
    preemph: Optional[float] = 0.97
    normalize: str = "per_feature"  # per_feature | all_features | none
    log: bool = True
    log_zero_guard_type: str = "add"  # add | clamp
    log_zero_guard_value: float = 2.0**-24
    mag_power: float = 2.0
    pad_to: int = 0
    pad_value: float = 0.0
    # NeMo zero-pads (repeats nothing) clips shorter than this before the preprocessor in transcribe().
    min_duration: float = 1.0


@dataclass
class EncoderConfig:
    feat_in: int = 128
    d_model: int = 1024
    n_layers: int = 32
    n_heads: int = 8
    ff_expansion_factor: int = 4
    conv_kernel_size: int = 9
    conv_norm_type: str = "batch_norm"  # batch_norm | layer_norm
    subsampling: str = "dw_striding"
    subsampling_factor: int = 8
    subsampling_conv_channels: int = 256
    xscaling: bool = False
    untie_biases: bool = True
    use_bias: bool = True
    pos_emb_max_len: int = 5000

    @property
    def d_ff(self) -> int:
        return self.d_model * self.ff_expansion_factor

    @property
    def subsampling_stages(self) -> int:
        return self.subsampling_factor.bit_length() - 1

    @property
    def subsampled_feat(self) -> int:
        """Frequency bins left after the strided convolutions (F')."""
        f = self.feat_in
        for _ in range(self.subsampling_stages):
            f = (f - 1) // 2 + 1
        return f


@dataclass
class DecoderConfig:
    hidden_size: int = 1024
    num_layers: int = 4
    num_heads: int = 8
    inner_size: int = 4096
    max_sequence_length: int = 1024
    hidden_act: str = "relu"
    vocab_size: int = 5248  # rows of the output head (tokenizer vocabulary padded to a multiple of 8)


@dataclass
class TokenizerConfig:
    type: str = "aggregate"  # aggregate (one SentencePiece per language + spl_tokens) | spe (one model)
    # aggregate: ordered [{"lang": "spl_tokens", "model_file": "...", "vocab_size": N}, ...]; the order fixes
    # the id offsets. spe: one entry with lang "all".
    langs: list = field(default_factory=list)

    @property
    def languages(self) -> list:
        return [entry["lang"] for entry in self.langs if entry["lang"] != "spl_tokens"]


@dataclass
class DecodingConfig:
    # NeMo's strategy from the checkpoint: "greedy"/"greedy_batch", or "beam" (whose search, even at size 1,
    # may emit one token more than greedy at the length cap).
    strategy: str = "beam"
    beam_size: int = 1
    length_penalty: float = 0.0
    max_generation_delta: int = -1  # < 0: cap at max_sequence_length regardless of audio length
    # Chunk length (s) for long audio when the caller names none; None: NeMo's 30-40 s planner. Set for models
    # trained on short utterances only (the bundled demo model).
    chunk_seconds: Optional[float] = None
    # How chunks of long audio are joined when no timestamps are asked for: "tokens", NeMo's LCS merge of the
    # generated ids (what NeMo does for canary-1b-v2), or "timestamps": decode the chunks with timestamps, merge
    # them by time, return the text only. NeMo's merge compares the next chunk's first 7 ids with the last 24
    # merged ones; with few ids per second (the demo model writes one per word) that window reaches far beyond the
    # 1 s overlap and a repeated word can cut a whole chunk out.
    chunk_merge: str = "tokens"


@dataclass
class AlignerConfig:
    """canary-1b-v2's timestamps model: a CTC FastConformer (NeMo ``EncDecCTCModelBPE``, ``ConvASRDecoder`` head) that
    force-aligns the AED's text. Stored beside the main model as ``aligner.safetensors`` + its SentencePiece file,
    described by the ``aligner`` section of config.json."""

    preprocessor: PreprocessorConfig = field(default_factory=PreprocessorConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    vocab_size: int = 0  # SentencePiece pieces; the CTC head has one output more, the blank (last)
    weights_file: str = "aligner.safetensors"
    tokenizer_file: str = "aligner_tokenizer.model"
    dtype: str = "float32"
    quantization: Optional[dict] = None

    @property
    def frame_seconds(self) -> float:
        """Seconds per output frame, as NeMo computes it (``window_stride * subsampling_factor``)."""
        return self.preprocessor.hop_length / self.preprocessor.sample_rate * self.encoder.subsampling_factor

    @property
    def files(self) -> list:
        return [self.weights_file, self.tokenizer_file]

    @classmethod
    def from_dict(cls, data: dict) -> "AlignerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {k: v for k, v in data.items() if k in known}
        kwargs["preprocessor"] = PreprocessorConfig(**data.get("preprocessor", {}))
        kwargs["encoder"] = EncoderConfig(**data.get("encoder", {}))
        return cls(**kwargs)


@dataclass
class ModelConfig:
    """A Canary encoder-decoder (the ``aed`` family)."""

    family = "aed"  # class constant: config.json of this family carries no family field (older model dirs neither)
    aligner_unknown = False  # set on configs read from a config.json without an "aligner" key (see ``aligner``)
    preprocessor: PreprocessorConfig = field(default_factory=PreprocessorConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    prompt_format: str = "canary2"  # canary (v1, 5 tokens) | canary2
    # Translation directions the model was trained for, [[source, target], ...]; None allows any pair.
    # Every released Canary translates between English and each other language only.
    translation_pairs: Optional[list] = None
    model_name: str = "canary"
    source: str = ""  # where the weights came from (path or repo id)
    nemo_version: str = ""
    dtype: str = "float32"
    quantization: Optional[dict] = None  # {"bits": 8, "group_size": 64}
    format_version: int = FORMAT_VERSION
    # canary-1b-v2's timestamps model (None: the .nemo had none). A config.json without this key was converted
    # before the aligner was: ``aligner_unknown`` is then set (not saved), and v2 timestamps ask for a re-conversion.
    aligner: Optional[AlignerConfig] = None

    @property
    def languages(self) -> list:
        return self.tokenizer.languages

    @property
    def required_files(self) -> list:
        """What a converted directory of this model holds besides config.json."""
        files = [WEIGHTS_FILE] + [str(e.get("model_file", "")) for e in self.tokenizer.langs]
        return files + (self.aligner.files if self.aligner else [])

    @property
    def has_projection(self) -> bool:
        return self.encoder.d_model != self.decoder.hidden_size

    @property
    def frame_shift(self) -> float:
        """Seconds per encoder output frame (NeMo: window_stride x subsampling factor)."""
        p = self.preprocessor
        return p.hop_length / p.sample_rate * self.encoder.subsampling_factor

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        sections = {
            "preprocessor": PreprocessorConfig,
            "encoder": EncoderConfig,
            "decoder": DecoderConfig,
            "tokenizer": TokenizerConfig,
            "decoding": DecodingConfig,
        }
        kwargs: dict[str, Any] = {}
        top_fields = {f.name for f in dataclasses.fields(cls)}
        for key, value in data.items():
            if key in sections:
                known = {f.name for f in dataclasses.fields(sections[key])}
                kwargs[key] = sections[key](**{k: v for k, v in value.items() if k in known})
            elif key == "aligner":
                kwargs[key] = None if value is None else AlignerConfig.from_dict(value)
            elif key in top_fields:
                kwargs[key] = value
        config = cls(**kwargs)
        config.aligner_unknown = "aligner" not in data
        return config

    def save(self, model_dir: Path) -> None:
        path = Path(model_dir) / CONFIG_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, model_dir: Path) -> "ModelConfig":
        return cls.from_dict(json.loads((Path(model_dir) / CONFIG_FILE).read_text()))


@dataclass
class SALMConfig:
    """A speech-LLM (NeMo speechlm2 ``SALM``, e.g. canary-qwen-2.5b): FastConformer + projection + a decoder-only LLM.

    ``llm`` is the LLM's own Hugging Face config (what ``mlx-lm`` builds its model from); the audio embeddings replace
    ``audio_locator_id`` in a chat prompt of ``prompt_format``.
    """

    family: str = "salm"
    preprocessor: PreprocessorConfig = field(default_factory=PreprocessorConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    llm: dict = field(default_factory=dict)
    prompt_format: str = "qwen"  # NeMo's PromptFormatter name
    audio_locator_tag: str = "<|audioplaceholder|>"
    audio_locator_id: int = -1
    eos_id: int = -1
    pad_id: int = -1
    user_prompt: str = "Transcribe the following: "  # the model card's ASR instruction; the audio follows it
    # Generation budget per input. NeMo's example script and model card pass 128, which cuts off the transcript of
    # a fast 40 s chunk (~4 tokens/s); a larger budget changes nothing before that point: the tokens equal NeMo's
    # up to where its budget would stop.
    max_new_tokens: int = 512
    lora_scale: Optional[float] = None  # lora_alpha / r of the merged adapter (None: the checkpoint had none)
    model_name: str = "salm"
    source: str = ""
    dtype: str = "float32"
    quantization: Optional[dict] = None
    format_version: int = FORMAT_VERSION

    @property
    def hidden_size(self) -> int:
        return int(self.llm["hidden_size"])

    @property
    def languages(self) -> list:
        return ["en"]

    @property
    def required_files(self) -> list:
        return [WEIGHTS_FILE, "tokenizer.json"]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SALMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {k: v for k, v in data.items() if k in known}
        kwargs["preprocessor"] = PreprocessorConfig(**data.get("preprocessor", {}))
        kwargs["encoder"] = EncoderConfig(**data.get("encoder", {}))
        return cls(**kwargs)

    def save(self, model_dir: Path) -> None:
        (Path(model_dir) / CONFIG_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, model_dir: Path) -> "SALMConfig":
        return cls.from_dict(json.loads((Path(model_dir) / CONFIG_FILE).read_text()))


def load_config(model_dir: Path):
    """The configuration of a converted model directory, of whichever family it is."""
    return config_from_dict(json.loads((Path(model_dir) / CONFIG_FILE).read_text()))


def config_from_dict(data: dict):
    """The configuration class of the family ``data`` names (no ``family``: a Canary AED model)."""
    family = data.get("family", "aed")
    if family == "salm":
        return SALMConfig.from_dict(data)
    if family != "aed":
        raise ValueError(f"unknown model family {family!r}")
    return ModelConfig.from_dict(data)
