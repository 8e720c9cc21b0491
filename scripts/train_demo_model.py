"""Train the tiny demo Canary model shipped in ``mlx_canary/demo/``: espeak-ng speech corpus, NeMo training, conversion.

Real Canary weights cannot be downloaded everywhere, and random-weight parity models never recognise speech. This
script trains a tiny model of the real architecture (NeMo ``EncDecMultiTaskModel``: FastConformer encoder,
Transformer decoder, ``canary2`` prompt, aggregate ``CanaryTokenizer`` with timestamp tokens) on speech it
synthesises itself, then converts it with ``mlx_canary.convert`` and writes what the tests compare against.

Run it with an interpreter that has NeMo 3.0 and torch, and espeak-ng (CPU only, one core; about 55 minutes: 1
minute of speech synthesis, 33 + 20 of training, 1 of reference and conversion):

    python scripts/train_demo_model.py                    # everything: corpus, training, reference, conversion
    python scripts/train_demo_model.py --steps 200 --long-steps 50 --out /tmp/demo   # a smoke run (useless model)
    python scripts/train_demo_model.py --from-stage1      # reuse <cache>/stage1.nemo: stage 2 + export
    python scripts/train_demo_model.py --skip-training    # reuse <cache>/demo.nemo: reference + conversion only

Corpus. Every word of a small vocabulary per language (digits and a few dozen common words; English, German,
Spanish, French) is synthesised alone with espeak-ng in many voice configurations (voice, variant, speed, pitch),
trimmed of silence and resampled to 16 kHz: a *word bank*. Utterances are concatenations of bank clips with
random pauses, so every word's start and end time is known to the sample. Training utterances are drawn fresh for
every batch: one sentence of 2-6 words, several sentences, or a random crop of a long stream (a word counts when
most of it lies inside the crop; this is what a long-audio chunk looks like), up to 12 s. Answers follow NeMo's
canary2 training format: prompt + answer + EOS, with ``<|s|>word<|e|>`` per word (encoder frames of 80 ms) when
the prompt asks for timestamps, punctuation and capitals when it asks for ``<|pnc|>``.

Training. The loss is NeMo's: cross-entropy of the answer tokens with teacher forcing (prompt tokens are not
predicted). Two training-only aids make a model this small learn on a CPU budget, both possible because the
synthesis says where every word is: a frame classifier on the encoder output (each 80 ms frame labelled with its
word or silence) and a guided cross-attention loss (a decoder position that emits a word's tokens should attend
to that word's frames). Neither adds anything to the saved model. AdamW, warmup then cosine decay. Two stages:
stage 1 (``TRAIN``) on utterances up to 12 s, its first steps on single sentences only; stage 2 (``LONG_TUNE``)
restores stage 1's ``.nemo`` and fine-tunes it on utterances up to 16 s, mostly several sentences and crops of
streams. Stage 1 alone recognises single sentences (held-out WER ~2 %) but loses its place in 10 s of
continuous speech without timestamps (~30 % WER on the long-audio path's 10 s chunks).

Held-out set. Two voice configurations per language that no training utterance uses (an unseen espeak-ng
variant, speed and pitch), and sentences (word orders) that never occur in training. Every held-out clip is a
list of parts (pauses in samples, words) in ``nemo_reference.json``, with a sha256 per voice of its word clips:
the tests rebuild the audio with this file's ``synthesize_word`` and know whether it is bit-identical to what NeMo
decoded.

Outputs (``--out``, default ``mlx_canary/demo``): the converted model (``config.json``, ``model.safetensors``,
``tokenizer_*.model``, ``nemo_config.yaml``), ``sample.wav`` (a held-out English sentence),
``nemo_reference.json`` (NeMo's tokens, text and word times for every held-out clip and prompt, from the restored
``.nemo``; the long recording's recipe) and ``demo.json`` (what was trained, how long it took, the scores). The
``.nemo``, the word banks and the training log stay in the cache directory (``--cache``, default
``$MLX_CANARY_DEMO_CACHE`` or ``~/.cache/mlx-canary-demo``), outside the repository.

Reproducible: one seed drives the corpus, the weights and the batch order; on the same machine (same espeak-ng,
numpy, torch, thread count) a rerun gives the same model. See docs/demo-model.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nemo_support import QuietStderr, quiet_nemo, reset_restore_state  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "mlx_canary" / "demo"
DEFAULT_CACHE = Path(os.environ.get("MLX_CANARY_DEMO_CACHE") or Path.home() / ".cache" / "mlx-canary-demo")
SEED = 20250601
SAMPLE_RATE = 16000
FRAME_SECONDS = 0.08  # one encoder frame: 10 ms hop x subsampling 8
FORMAT_VERSION = 1

# --------------------------------------------------------------------------------------------------------------
# Vocabulary. Words are written as they appear with punctuation and capitals (German nouns capitalised); without
# <|pnc|> the answer is lower case without punctuation. Near-homophones within a language are avoided (French
# "et"/"est", "haut"/"eau"), since word-by-word synthesis gives no context to tell them apart.

VOCAB = {
    "en": (
        "zero one two three four five six seven eight nine ten yes no hello please thanks red blue green black "
        "white big small old new cat dog bird fish horse house car tree water book door open close stop go come "
        "look left right up down day night morning today good the and is"
    ).split(),
    "de": (
        "null eins zwei drei vier fünf sechs sieben acht neun zehn ja nein hallo bitte danke rot blau grün "
        "schwarz weiß groß klein alt neu Katze Hund Vogel Fisch Pferd Haus Auto Baum Wasser Buch Tür auf zu halt "
        "gehen kommen sehen links rechts oben unten Tag Nacht Morgen heute gut der und ist"
    ).split(),
    "es": (
        "cero uno dos tres cuatro cinco seis siete ocho nueve diez sí no hola gracias adiós rojo azul verde negro "
        "blanco grande pequeño viejo nuevo gato perro pájaro pez caballo casa coche árbol agua libro puerta abrir "
        "cerrar parar ir venir mirar izquierda derecha arriba abajo día noche mañana hoy bueno el y es"
    ).split(),
    "fr": (
        "zéro un deux trois quatre cinq six sept huit neuf dix oui non bonjour merci salut rouge bleu vert noir "
        "blanc grand petit vieux nouveau chat chien oiseau poisson cheval maison voiture arbre eau livre porte "
        "ouvrir fermer arrêter aller venir regarder gauche droite devant derrière jour nuit matin soir bon le "
        "avec"
    ).split(),
}
LANGS = tuple(VOCAB)

# espeak-ng voices per language (the base voice of a configuration is drawn from these) and voice variants.
BASE_VOICES = {
    "en": ["en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-us-nyc"],
    "de": ["de"],
    "es": ["es", "es-419"],
    "fr": ["fr-fr", "fr-be", "fr-ch"],
}
TRAIN_VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m8", "f1", "f2", "f3", "f4", "klatt2", "klatt4", "andy",
                  "annie", "david", "edward", "linda", "robert", "steph"]
TRAIN_SPEEDS = (130, 200)  # espeak-ng words per minute, drawn uniformly
TRAIN_PITCHES = (25, 75)
N_TRAIN_VOICES = 24  # voice configurations per language
# Held out: variants, and (speed, pitch) pairs, that training never uses.
HELDOUT_VOICES = {
    "en": [("en-us", "m7", 165, 45), ("en-gb", "f5", 150, 62)],
    "de": [("de", "m7", 160, 45), ("de", "f5", 150, 62)],
    "es": [("es", "m7", 165, 45), ("es-419", "f5", 150, 62)],
    "fr": [("fr-fr", "m7", 160, 45), ("fr-be", "f5", 150, 62)],
}

# Pauses (seconds): between words of a sentence, between sentences, before/after an utterance.
WORD_GAP = (0.03, 0.22)
SENTENCE_GAP = (0.35, 0.8)
EDGE_PAD = (0.1, 0.45)
SENTENCE_WORDS = (2, 6)

# Held-out set: clips per language and voice; every clip is decoded with two prompts (see HELDOUT_PROMPTS).
HELDOUT_PER_VOICE = 15
HELDOUT_PROMPTS = {
    "pnc": dict(pnc=True, timestamps=False),
    "nopnc_ts": dict(pnc=False, timestamps=True),
}
LONG_SECONDS = 190.0  # the long recording (English, first held-out voice)
LONG_CHUNK_SECONDS = 10.0  # chunk length the demo model is meant to be used with on long audio

# --------------------------------------------------------------------------------------------------------------
# Model and training hyper-parameters.

MODEL = dict(
    n_mels=80,
    enc_d=128,
    enc_layers=4,
    enc_heads=4,
    sub_channels=64,
    dec_d=160,
    dec_layers=2,
    dec_heads=4,
    max_seq=256,
    lang_vocab=384,  # every word is one piece, lower case or capitalised
    n_timestamps=250,  # <|0|>..<|249|>: 20 s of 80 ms frames (longer than any training utterance)
)
TRAIN = dict(
    steps=4500,
    batch_seconds=60.0,  # padded audio per batch (bucketed by length)
    max_batch=48,
    lr=2e-3,
    warmup=300,
    weight_decay=1e-2,
    clip=1.0,
    eval_every=250,
    timestamp_share=0.4,
    pnc_share=0.5,
    # utterance kinds: one sentence / several sentences / a crop of a long stream
    kind_shares=(0.4, 0.25, 0.35),
    short_steps=400,  # first steps: single sentences only
    max_seconds=12.0,
    crop_seconds=(2.0, 12.0),  # length of a crop of a stream
    aux_weight=0.3,  # auxiliary frame classification loss on the encoder output (training only)
    attn_weight=0.3,  # guided cross-attention loss (training only)
)
# Stage 2: the stage-1 model (rounded to float16 and saved as stage1.nemo) fine-tuned on longer utterances. Trained
# on at most 12 s, the model recognises single sentences but loses its place in 10 s of continuous speech (the
# long-audio chunk length); without timestamp tokens to anchor it, the decoder repeats or skips words. Reseeded, so
# that resuming from a saved stage1.nemo (--from-stage1) gives the same model as an uninterrupted run.
LONG_TUNE = dict(
    TRAIN,
    steps=2500,
    lr=6e-4,
    warmup=100,
    short_steps=0,
    max_seconds=16.0,
    # mostly crops: a long-audio chunk starts and ends inside speech, often inside a word
    kind_shares=(0.1, 0.25, 0.65),
    crop_seconds=(6.0, 14.0),
    seed="long",
)

SPECIALS = [
    "translate", "transcribe", *LANGS, "startofcontext", "emo:undefined", "emo:neutral", "emo:angry", "emo:happy",
    "emo:sad", "itn", "noitn", "timestamp", "notimestamp", "diarize", "nodiarize",
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------------------
# Word bank: espeak-ng, one word at a time.


@dataclass(frozen=True)
class Voice:
    lang: str
    voice: str  # espeak-ng voice name
    variant: str
    speed: int
    pitch: int

    @property
    def key(self) -> str:
        return f"{self.lang}_{self.voice}+{self.variant}_s{self.speed}_p{self.pitch}"

    @property
    def espeak_voice(self) -> str:
        return f"{self.voice}+{self.variant}"


def train_voices(lang: str, seed: int = SEED) -> list[Voice]:
    rng = random.Random(f"{seed}-voices-{lang}")
    held = {(v[2], v[3]) for vs in HELDOUT_VOICES.values() for v in vs}
    voices: list[Voice] = []
    variants = TRAIN_VARIANTS[:]
    rng.shuffle(variants)
    while len(voices) < N_TRAIN_VOICES:
        variant = variants[len(voices) % len(variants)]
        speed, pitch = rng.randint(*TRAIN_SPEEDS), rng.randint(*TRAIN_PITCHES)
        if (speed, pitch) in held:
            continue
        voices.append(Voice(lang, rng.choice(BASE_VOICES[lang]), variant, speed, pitch))
    return voices


def heldout_voices(lang: str) -> list[Voice]:
    return [Voice(lang, *v) for v in HELDOUT_VOICES[lang]]


def espeak_version() -> str:
    out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout
    return out.strip()


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        rate = w.getframerate()
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64) / 32768.0
    return data, rate


def _trim(x: np.ndarray, rate: int, floor_db: float = -42.0, margin: float = 0.01) -> np.ndarray:
    """Cut leading/trailing silence: 5 ms frames more than 42 dB below the loudest frame, minus a 10 ms margin."""
    hop = max(1, int(rate * 0.005))
    n = len(x) // hop
    if n == 0:
        return x
    rms = np.sqrt(np.mean(x[: n * hop].reshape(n, hop) ** 2, axis=1) + 1e-12)
    loud = np.nonzero(20 * np.log10(rms / rms.max()) > floor_db)[0]
    m = int(margin * rate)
    start = max(0, loud[0] * hop - m)
    end = min(len(x), (loud[-1] + 1) * hop + m)
    return x[start:end]


def resample(x: np.ndarray, rate: int, half_taps: int = 24, beta: float = 8.0) -> np.ndarray:
    """Windowed-sinc resampling to 16 kHz in plain numpy (float64): the same samples wherever numpy runs, so the
    tests can rebuild the held-out audio bit for bit without scipy."""
    if rate == SAMPLE_RATE:
        return x.astype(np.float64)
    n_out = len(x) * SAMPLE_RATE // rate
    pos = np.arange(n_out, dtype=np.int64) * rate  # output instant n sits at input sample pos / SAMPLE_RATE
    base, phase = pos // SAMPLE_RATE, pos % SAMPLE_RATE
    phases, inverse = np.unique(phase, return_inverse=True)  # a rational ratio repeats few phases
    taps = np.arange(-half_taps + 1, half_taps + 1)
    dist = phases[:, None] / SAMPLE_RATE - taps[None, :]
    cutoff = 0.5 * min(1.0, SAMPLE_RATE / rate) * 0.94  # cycles per input sample, below the new Nyquist
    window = np.i0(beta * np.sqrt(np.clip(1.0 - (dist / half_taps) ** 2, 0.0, None))) / np.i0(beta)
    bank = 2 * cutoff * np.sinc(2 * cutoff * dist) * window
    padded = np.concatenate([np.zeros(half_taps), x.astype(np.float64), np.zeros(half_taps + 1)])
    idx = base[:, None] + taps[None, :] + half_taps
    return (padded[idx] * bank[inverse.reshape(-1)]).sum(axis=1)


def synthesize_word(word: str, voice: Voice, tmp: Path) -> np.ndarray:
    """One word -> int16 samples at 16 kHz, silence trimmed, peak at half scale."""
    path = tmp / "w.wav"
    subprocess.run(
        ["espeak-ng", "-v", voice.espeak_voice, "-s", str(voice.speed), "-p", str(voice.pitch), "-w", str(path),
         word],
        check=True, capture_output=True,
    )
    x, rate = _read_wav(path)
    x = _trim(x, rate)
    y = resample(x, rate)
    peak = float(np.abs(y).max())
    if peak > 0:
        y = y * (0.5 / peak)  # same peak level for every clip; utterances get random gains later
    return np.clip(np.round(y * 32767), -32768, 32767).astype(np.int16)


def build_bank(voices: list[Voice], cache: Path) -> dict[str, dict[str, np.ndarray]]:
    """{voice key: {word: int16 clip}}, cached per voice in <cache>/bank/<key>.npz."""
    bank_dir = cache / "bank"
    bank_dir.mkdir(parents=True, exist_ok=True)
    bank = {}
    todo = [v for v in voices if not (bank_dir / f"{v.key}.npz").exists()]
    if todo:
        log(f"synthesising {len(todo)} voice configurations x ~{len(VOCAB['en'])} words with espeak-ng")
    from concurrent.futures import ThreadPoolExecutor

    def make(v: Voice) -> None:
        path = bank_dir / f"{v.key}.npz"
        with tempfile.TemporaryDirectory() as tmp:
            clips = {w: synthesize_word(w, v, Path(tmp)) for w in VOCAB[v.lang]}
        np.savez(path.with_suffix(".tmp.npz"), **clips)
        os.replace(path.with_suffix(".tmp.npz"), path)

    # Every clip depends on its word and voice only, so two espeak-ng processes at a time change nothing.
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(make, todo))
    for v in voices:
        with np.load(bank_dir / f"{v.key}.npz") as z:
            bank[v.key] = {w: z[w] for w in VOCAB[v.lang]}
    return bank


# --------------------------------------------------------------------------------------------------------------
# Utterances: parts (pauses and words) -> samples, word times and answer texts.


@dataclass
class Utterance:
    lang: str
    voice: str  # bank key
    sentences: list[list[str]]
    parts: list  # ["sil", n_samples] or ["w", word]; words in sentence order
    audio: np.ndarray = None  # float32
    words: list = field(default_factory=list)  # [{"text", "start", "end", "sentence", "index"}] (seconds)
    crop: tuple | None = None  # (start, end) samples of a crop of the composed stream


def compose(parts: list, clips: dict[str, np.ndarray]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """int16 samples of the parts and the (start, end) sample span of every word part."""
    pieces, spans, pos = [], [], 0
    for kind, value in parts:
        if kind == "sil":
            pieces.append(np.zeros(int(value), np.int16))
            pos += int(value)
        else:
            clip = clips[value]
            pieces.append(clip)
            spans.append((pos, pos + len(clip)))
            pos += len(clip)
    return (np.concatenate(pieces) if pieces else np.zeros(0, np.int16)), spans


def make_parts(sentences: list[list[str]], rng: random.Random) -> list:
    def sil(lo_hi):
        return ["sil", int(rng.uniform(*lo_hi) * SAMPLE_RATE)]

    parts = [sil(EDGE_PAD)]
    for si, sentence in enumerate(sentences):
        if si:
            parts.append(sil(SENTENCE_GAP))
        for wi, word in enumerate(sentence):
            if wi:
                parts.append(sil(WORD_GAP))
            parts.append(["w", word])
    parts.append(sil(EDGE_PAD))
    return parts


def word_forms(sentences: list[list[str]], pnc: bool) -> list[str]:
    """The words as the answer writes them: with <|pnc|> the first word of a sentence is capitalised and the last
    ends with a full stop; without, everything is lower case without punctuation."""
    out = []
    for sentence in sentences:
        for i, w in enumerate(sentence):
            if not pnc:
                out.append(w.lower())
                continue
            if i == 0:
                w = w[0].upper() + w[1:]
            if i == len(sentence) - 1:
                w = w + "."
            out.append(w)
    return out


def realize(utt: Utterance, bank, rng: np.random.Generator | None = None) -> Utterance:
    """Fill audio and word times; with ``rng``, apply a random gain and faint noise (training only)."""
    samples, spans = compose(utt.parts, bank[utt.voice])
    flat = [w for s in utt.sentences for w in s]
    sent_of = [i for i, s in enumerate(utt.sentences) for _ in s]
    pos_of = [j for s in utt.sentences for j in range(len(s))]
    words = [
        {"word": w, "start": a / SAMPLE_RATE, "end": b / SAMPLE_RATE, "sentence": si, "index": pi}
        for w, (a, b), si, pi in zip(flat, spans, sent_of, pos_of)
    ]
    audio = samples.astype(np.float32) / 32768.0
    if utt.crop is not None:
        c0, c1 = utt.crop
        audio = audio[c0:c1]
        kept = []
        for w in words:
            a, b = w["start"] * SAMPLE_RATE, w["end"] * SAMPLE_RATE
            inside = max(0.0, min(b, c1) - max(a, c0))
            if inside >= 0.5 * (b - a):  # most of the word is in the crop
                kept.append(dict(w, start=max(a, c0) / SAMPLE_RATE - c0 / SAMPLE_RATE,
                                 end=min(b, c1) / SAMPLE_RATE - c0 / SAMPLE_RATE))
        words = kept
    if rng is not None:
        audio = audio * float(rng.uniform(0.3, 1.6))
        if rng.random() < 0.5:
            audio = audio + rng.normal(0, float(rng.uniform(1e-4, 4e-3)), len(audio)).astype(np.float32)
        audio = audio.astype(np.float32)
    utt.audio = audio
    utt.words = words
    return utt


def answer_words(utt: Utterance, pnc: bool) -> list[str]:
    """Answer words of the (possibly cropped) utterance, punctuated by the rules of ``word_forms`` applied to the
    full sentences (a crop keeps the case and punctuation each word had in its sentence)."""
    forms = word_forms(utt.sentences, pnc)
    offsets = np.cumsum([0] + [len(s) for s in utt.sentences])
    return [forms[offsets[w["sentence"]] + w["index"]] for w in utt.words]


def word_frames(utt: Utterance) -> list[tuple[int, int]]:
    """(start, end) of every answer word in encoder frames (80 ms), rounded to the nearest frame."""
    out = []
    for t in utt.words:
        s = int(round(t["start"] / FRAME_SECONDS))
        out.append((s, max(s, int(round(t["end"] / FRAME_SECONDS)))))
    return out


def answer_text(utt: Utterance, pnc: bool, timestamps: bool) -> str:
    """The answer as NeMo's canary2 training data writes it: ``<|s|>word<|e|>`` per word with timestamps."""
    words = answer_words(utt, pnc)
    if not timestamps:
        return " ".join(words)
    return " ".join(f"<|{s}|>{w}<|{e}|>" for w, (s, e) in zip(words, word_frames(utt)))


def random_sentence(lang: str, rng: random.Random, exclude: set) -> list[str]:
    while True:
        s = [rng.choice(VOCAB[lang]) for _ in range(rng.randint(*SENTENCE_WORDS))]
        if tuple(s) not in exclude:
            return s


class TrainSampler:
    """Fresh training utterances from the training banks; never a held-out sentence."""

    def __init__(self, voices: dict[str, list[Voice]], bank, exclude: set, seed: int, hp: dict = TRAIN):
        self.voices = voices
        self.bank = bank
        self.exclude = exclude
        self.hp = hp
        tag = hp.get("seed")
        self.rng = random.Random(f"{seed}-train" + (f"-{tag}" if tag else ""))
        self.nrng = np.random.default_rng([seed, 1] if tag else seed)
        self.warmup = False  # True: single sentences only (the first steps: alignment is easiest on short clips)

    def draw(self) -> tuple[Utterance, dict]:
        rng = self.rng
        lang = rng.choice(LANGS)
        voice = rng.choice(self.voices[lang])
        hp = self.hp
        shares = hp["kind_shares"] if not self.warmup else (1.0, 0.0, 0.0)
        kind = rng.choices(["one", "several", "crop"], weights=shares)[0]
        max_s = hp["max_seconds"]
        if kind == "one":
            sentences = [random_sentence(lang, rng, self.exclude)]
        else:
            # several sentences, or a stream a crop is taken from
            budget = rng.uniform(3.0, max_s) if kind == "several" else rng.uniform(6.0, 2 * max_s)
            sentences = []
            while sum(len(s) for s in sentences) * 0.45 + len(sentences) * 0.6 < budget:
                sentences.append(random_sentence(lang, rng, self.exclude))
        utt = Utterance(lang, voice.key, sentences, make_parts(sentences, rng))
        total = len(compose(utt.parts, self.bank[voice.key])[0])
        if kind == "crop":
            length = int(rng.uniform(*hp["crop_seconds"]) * SAMPLE_RATE)
            if total > length:
                c0 = rng.randint(0, total - length)
                utt.crop = (c0, c0 + length)
        elif total > max_s * SAMPLE_RATE:
            utt.crop = (0, int(max_s * SAMPLE_RATE))
        realize(utt, self.bank, self.nrng)
        prompt = dict(
            lang=lang,
            pnc=rng.random() < hp["pnc_share"],
            timestamps=rng.random() < hp["timestamp_share"],
        )
        return utt, prompt


# --------------------------------------------------------------------------------------------------------------
# Held-out set.


def heldout_sentences(seed: int = SEED) -> dict[str, list[list[str]]]:
    rng = random.Random(f"{seed}-heldout")
    out = {}
    for lang in LANGS:
        n = HELDOUT_PER_VOICE * len(HELDOUT_VOICES[lang])
        seen, sents = set(), []
        while len(sents) < n:
            s = [rng.choice(VOCAB[lang]) for _ in range(rng.randint(*SENTENCE_WORDS))]
            if tuple(s) not in seen:
                seen.add(tuple(s))
                sents.append(s)
        out[lang] = sents
    return out


def long_sentences(seed: int = SEED) -> list[list[str]]:
    """Sentences of the long recording (English): enough for LONG_SECONDS at the held-out voice's pace."""
    rng = random.Random(f"{seed}-long")
    return [[rng.choice(VOCAB["en"]) for _ in range(rng.randint(3, 7))] for _ in range(90)]


def heldout_clips(seed: int = SEED) -> list[Utterance]:
    rng = random.Random(f"{seed}-heldout-parts")
    sents = heldout_sentences(seed)
    clips = []
    for lang in LANGS:
        voices = heldout_voices(lang)
        for i, sentence in enumerate(sents[lang]):
            v = voices[i % len(voices)]
            clips.append(Utterance(lang, v.key, [sentence], make_parts([sentence], rng)))
    return clips


def long_recording(bank, seed: int = SEED) -> Utterance:
    rng = random.Random(f"{seed}-long-parts")
    v = heldout_voices("en")[0]
    chosen = []
    for s in long_sentences(seed):
        chosen.append(s)
        utt = Utterance("en", v.key, chosen, make_parts(chosen, random.Random(0)))
        if len(compose(utt.parts, bank[v.key])[0]) >= LONG_SECONDS * SAMPLE_RATE:
            break
    return Utterance("en", v.key, chosen, make_parts(chosen, rng))


def split_sentences(parts: list, sentences: list[list[str]], edge: float = 0.3) -> list[list]:
    """The sentences of a multi-sentence recording as separate clips: the same word clips and in-sentence pauses,
    ``edge`` seconds of silence before and after."""
    pad = ["sil", int(edge * SAMPLE_RATE)]
    out, cur, left = [], [], list(len(s) for s in sentences)
    for kind, value in parts:
        if kind == "w":
            cur.append([kind, value])
            left[len(out)] -= 1
            if left[len(out)] == 0:
                out.append([pad] + cur + [pad])
                cur = []
        elif cur:  # a pause inside a sentence
            cur.append([kind, value])
    return out


def grouped_sentences(utt: Utterance, bank, seconds: float = 8.0) -> list[Utterance]:
    """Consecutive sentences of a long recording joined into utterances of about ``seconds`` (with the long
    recording's own pauses): evaluation clips as long as a long-audio chunk."""
    out, cur_parts, cur_sents = [], [], []
    for parts, sentence in zip(split_sentences(utt.parts, utt.sentences), utt.sentences):
        cur_parts, cur_sents = cur_parts + parts, cur_sents + [sentence]
        if len(compose(cur_parts, bank[utt.voice])[0]) >= seconds * SAMPLE_RATE:
            out.append(Utterance(utt.lang, utt.voice, cur_sents, cur_parts))
            cur_parts, cur_sents = [], []
    if cur_sents:
        out.append(Utterance(utt.lang, utt.voice, cur_sents, cur_parts))
    return out


def bank_sha256(clips: dict[str, np.ndarray], words: list[str]) -> str:
    import hashlib

    h = hashlib.sha256()
    for w in words:
        h.update(w.encode() + b"\0" + np.ascontiguousarray(clips[w], dtype="<i2").tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Metrics (tests/test_demo_model.py uses these too).


def normalize_words(text: str) -> list[str]:
    out = []
    for w in text.lower().split():
        w = w.strip(".,?!;:")
        if w:
            out.append(w)
    return out


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def wer(pairs: list[tuple[str, str]]) -> float:
    errors = sum(edit_distance(normalize_words(r), normalize_words(h)) for r, h in pairs)
    words = sum(len(normalize_words(r)) for r, _ in pairs)
    return errors / max(1, words)


# --------------------------------------------------------------------------------------------------------------
# NeMo model.


def tokenizer_text(lang: str, seed: int) -> list[str]:
    """Lines to train a language's SentencePiece model on: every word in both cases, with and without a full stop,
    many times over, so that BPE merges whole words."""
    rng = random.Random(f"{seed}-spm-{lang}")
    lines = []
    for _ in range(40):
        words = VOCAB[lang][:]
        rng.shuffle(words)
        for i in range(0, len(words), 5):
            sentence = [words[i: i + 5]]
            lines.append(" ".join(word_forms(sentence, pnc=True)))
            lines.append(" ".join(word_forms(sentence, pnc=False)))
    return lines


def _drop_normalizer(model_file: Path) -> None:
    """Identity normalisation: drops the 230 kB NFKC table from a SentencePiece file (our texts are NFC already and
    contain no compatibility characters, so no piece changes; the shipped tokenizer files get 60x smaller)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(model_file.read_bytes())
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.precompiled_charsmap = b""
    model_file.write_bytes(m.SerializeToString())


def build_tokenizers(work: Path, seed: int) -> dict:
    import sentencepiece as spm

    from nemo.collections.common.tokenizers.canary_tokenizer import CanaryTokenizer
    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import create_spt_model

    spm.set_random_generator_seed(seed % 2**31)
    spl_dir = work / "spl_tokens"  # fresh directory: force_rebuild=True would delete files in the CWD
    specials = SPECIALS + [str(i) for i in range(MODEL["n_timestamps"])]
    with QuietStderr():
        CanaryTokenizer.build_special_tokenizer(specials, spl_dir, force_rebuild=False)
    _drop_normalizer(spl_dir / "tokenizer.model")
    langs = {"spl_tokens": {"dir": str(spl_dir), "type": "bpe"}}
    for lang in LANGS:
        d = work / f"tok_{lang}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "train_text.txt").write_text("\n".join(tokenizer_text(lang, seed)) + "\n", encoding="utf-8")
        spm.set_random_generator_seed(seed % 2**31)
        with QuietStderr():
            create_spt_model(str(d / "train_text.txt"), vocab_size=MODEL["lang_vocab"], sample_size=-1,
                             do_lower_case=False, tokenizer_type="bpe", output_dir=str(d))
        _drop_normalizer(d / "tokenizer.model")
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


def model_config(tokenizer_cfg: dict) -> dict:
    m = MODEL
    enc_d, dec_d = m["enc_d"], m["dec_d"]
    return {
        "sample_rate": SAMPLE_RATE,
        "label_smoothing": 0.0,
        "use_loss_mask_for_prompt": True,
        "prompt_format": "canary2",
        "prompt_defaults": [
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
        ],
        "model_defaults": {"asr_enc_hidden": enc_d, "lm_enc_hidden": dec_d, "lm_dec_hidden": dec_d},
        "tokenizer": tokenizer_cfg,
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "sample_rate": SAMPLE_RATE,
            "normalize": "per_feature",
            "window_size": 0.025,
            "window_stride": 0.01,
            "window": "hann",
            "features": m["n_mels"],
            "n_fft": 512,
            "log": True,
            "frame_splicing": 1,
            "dither": 1e-5,
            "pad_to": 0,
            "pad_value": 0.0,
        },
        "spec_augment": None,
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConformerEncoder",
            "feat_in": m["n_mels"],
            "feat_out": -1,
            "n_layers": m["enc_layers"],
            "d_model": enc_d,
            "subsampling": "dw_striding",
            "subsampling_factor": 8,
            "subsampling_conv_channels": m["sub_channels"],
            "causal_downsampling": False,
            "ff_expansion_factor": 4,
            "self_attention_model": "rel_pos",
            "n_heads": m["enc_heads"],
            "att_context_size": [-1, -1],
            "xscaling": False,
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
            "num_attention_heads": m["dec_heads"],
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
                "max_sequence_length": m["max_seq"],
                "num_token_types": 0,
                "embedding_dropout": 0.0,
                "learn_positional_encodings": False,
                "hidden_size": dec_d,
                "inner_size": 4 * dec_d,
                "num_layers": m["dec_layers"],
                "num_attention_heads": m["dec_heads"],
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
        # NeMo reads greedy.temperature / greedy.n_samples unguarded: a greedy block must carry them.
        "decoding": {"strategy": "greedy_batch",
                     "greedy": {"max_generation_delta": 50, "temperature": None, "n_samples": 1}},
        "loss": {
            "_target_": "nemo.collections.common.losses.smoothed_cross_entropy.SmoothedCrossEntropyLoss",
            "label_smoothing": 0.0,
            "pad_id": None,
        },
    }


def build_model(work: Path, seed: int):
    import torch
    from omegaconf import OmegaConf

    from nemo.collections.asr.models import EncDecMultiTaskModel

    torch.manual_seed(seed)
    cfg = OmegaConf.create(model_config(build_tokenizers(work, seed)))
    torch.manual_seed(seed)
    model = EncDecMultiTaskModel(cfg=cfg)
    return model


def encode_example(model, utt: Utterance, prompt: dict) -> tuple[list[int], int]:
    """(prompt + answer + EOS ids, prompt length) exactly as NeMo's canary2 training path builds them."""
    from nemo.collections.common.tokenizers.canary_tokenizer import CANARY_SPECIAL_TOKENIZER

    lang = prompt["lang"]
    slots = {
        "decodercontext": "",
        "emotion": "<|emo:undefined|>",
        "source_lang": f"<|{lang}|>",
        "target_lang": f"<|{lang}|>",
        "pnc": "<|pnc|>" if prompt["pnc"] else "<|nopnc|>",
        "itn": "<|noitn|>",
        "timestamp": "<|timestamp|>" if prompt["timestamps"] else "<|notimestamp|>",
        "diarize": "<|nodiarize|>",
        model.prompt.PROMPT_LANGUAGE_SLOT: CANARY_SPECIAL_TOKENIZER,
    }
    text = answer_text(utt, prompt["pnc"], prompt["timestamps"])
    turns = [
        {"role": "user", "slots": slots},
        {"role": "assistant", "slots": {"text": text, model.prompt.PROMPT_LANGUAGE_SLOT: lang}},
    ]
    enc = model.prompt.encode_dialog(turns)
    ids = enc["input_ids"].tolist()
    n_prompt = len(enc["context_ids"])
    assert ids[-1] == model.tokenizer.eos_id
    return ids, n_prompt


def word_positions(model, utt: Utterance, prompt: dict, ids: list[int], n_prompt: int) -> list[int]:
    """For every id of ``ids``: the index of the answer word it belongs to (its timestamps included), -1 for the
    prompt and EOS. Rebuilt word by word and checked against NeMo's ids; None if they disagree."""
    tok = model.tokenizer
    words = answer_words(utt, prompt["pnc"])
    per_word = [tok.text_to_ids(w, prompt["lang"]) for w in words]
    if prompt["timestamps"]:
        per_word = [[tok.token_to_id(f"<|{s}|>", "spl_tokens")] + p + [tok.token_to_id(f"<|{e}|>", "spl_tokens")]
                    for p, (s, e) in zip(per_word, word_frames(utt))]
    flat = [t for p in per_word for t in p]
    if flat != ids[n_prompt:-1]:
        return None
    return [-1] * n_prompt + [k for k, p in enumerate(per_word) for _ in p] + [-1]


def prompt_ids(model, lang: str, pnc: bool, timestamps: bool) -> list[int]:
    from nemo.collections.common.tokenizers.canary_tokenizer import CANARY_SPECIAL_TOKENIZER

    slots = {
        "decodercontext": "",
        "emotion": "<|emo:undefined|>",
        "source_lang": f"<|{lang}|>",
        "target_lang": f"<|{lang}|>",
        "pnc": "<|pnc|>" if pnc else "<|nopnc|>",
        "itn": "<|noitn|>",
        "timestamp": "<|timestamp|>" if timestamps else "<|notimestamp|>",
        "diarize": "<|nodiarize|>",
        model.prompt.PROMPT_LANGUAGE_SLOT: CANARY_SPECIAL_TOKENIZER,
    }
    return model.prompt.encode_dialog([{"role": "user", "slots": slots}])["context_ids"].tolist()


# --------------------------------------------------------------------------------------------------------------
# Training.


def _pad_batch(audios: list[np.ndarray]):
    import torch

    n = max(len(a) for a in audios)
    x = np.zeros((len(audios), n), np.float32)
    for i, a in enumerate(audios):
        x[i, : len(a)] = a
    return torch.from_numpy(x), torch.tensor([len(a) for a in audios], dtype=torch.long)


def batches(sampler: TrainSampler, model, pool_size: int = 384):
    """Endless stream of length-bucketed batches: a pool of fresh utterances sorted by duration, cut into batches
    of at most ``batch_seconds`` padded audio, in random order."""
    rng = random.Random(f"{SEED}-batches")
    while True:
        pool = []
        for _ in range(pool_size):
            utt, prompt = sampler.draw()
            ids, n_prompt = encode_example(model, utt, prompt)
            # frame labels for the auxiliary loss: (first frame, end frame, id of the lower-case word)
            spans = [(s, max(s + 1, e), model.tokenizer.text_to_ids(w["word"].lower(), prompt["lang"])[0])
                     for w, (s, e) in zip(utt.words, word_frames(utt))]
            pool.append((utt, prompt, ids, n_prompt, spans, word_positions(model, utt, prompt, ids, n_prompt)))
        pool.sort(key=lambda p: len(p[0].audio))
        out, cur = [], []
        for item in pool:
            longest = max([len(item[0].audio)] + [len(c[0].audio) for c in cur]) / SAMPLE_RATE
            if cur and (longest * (len(cur) + 1) > TRAIN["batch_seconds"] or len(cur) >= TRAIN["max_batch"]):
                out.append(cur)
                cur = []
            cur.append(item)
        if cur:
            out.append(cur)
        rng.shuffle(out)
        yield from out


def loss_on_batch(model, frame_head, batch, hp: dict = TRAIN):
    """NeMo's teacher-forced cross-entropy on the answer tokens, plus an auxiliary frame classification loss on the
    encoder output: every 80 ms frame is labelled with the word the synthesis put there (or silence). The frame
    head is training-only (not part of the saved model); it makes the tiny encoder tell words apart within a few
    hundred steps instead of thousands."""
    import torch

    audio, audio_len = _pad_batch([b[0].audio for b in batch])
    pad = model.tokenizer.pad_id
    n = max(len(b[2]) for b in batch)
    ids = torch.full((len(batch), n), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), n - 1), dtype=torch.float32)
    for i, (_, _, seq, n_prompt, _, _) in enumerate(batch):
        ids[i, : len(seq)] = torch.tensor(seq)
        # position j predicts token j+1: the answer tokens and EOS, never the prompt (NeMo's
        # use_loss_mask_for_prompt)
        mask[i, n_prompt - 1 : len(seq) - 1] = 1.0
    inp, labels = ids[:, :-1], ids[:, 1:]
    lengths = torch.tensor([len(b[2]) - 1 for b in batch], dtype=torch.long)
    captured = {}
    hook = model.transf_decoder._decoder.register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("xatt", out[1])
    )
    try:
        log_probs, enc_len, enc_states, _ = model.forward(
            input_signal=audio, input_signal_length=audio_len, transcript=inp, transcript_length=lengths
        )
    finally:
        hook.remove()
    nll = -log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ce = (nll * mask).sum() / mask.sum()
    silence = frame_head.out_features - 1
    frames = torch.full(enc_states.shape[:2], -100, dtype=torch.long)  # -100: padding, ignored
    for i, b in enumerate(batch):
        n = int(enc_len[i])
        frames[i, :n] = silence
        for first, end, tok in b[4]:
            frames[i, max(0, first) : min(n, end)] = tok
    aux = torch.nn.functional.cross_entropy(frame_head(enc_states).transpose(1, 2), frames, ignore_index=-100)
    # Guided cross-attention: the decoder position that predicts a word's ids (or its timestamps) should attend
    # to that word's frames (head and layer average).
    target = torch.zeros(log_probs.shape[0], log_probs.shape[1], enc_states.shape[1])
    for i, b in enumerate(batch):
        if b[5] is None:
            continue
        for j, k in enumerate(b[5][1:]):  # position j predicts id j + 1
            if k >= 0:
                first, end, _ = b[4][k]
                target[i, j, max(0, first) : max(max(0, first) + 1, end)] = 1.0
    att = torch.stack([x.mean(1) for x in captured["xatt"]]).mean(0)  # (B, L, T)
    guided = target.sum(-1) > 0
    mass = (att * target).sum(-1)
    attn = -(torch.log(mass + 1e-4) * guided).sum() / guided.sum().clamp(min=1)
    w = hp["aux_weight"]
    total = (1 - w) * ce + w * aux + hp["attn_weight"] * attn
    return total, float(ce), float(aux), float(attn)


def lr_at(step: int, total: int, hp: dict = TRAIN) -> float:
    peak, warm = hp["lr"], hp["warmup"]
    if step < warm:
        return peak * (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)
    return peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac)))


def greedy_texts(model, audios: list[np.ndarray], prompt: list[int], batch_size: int = 16) -> list[str]:
    """NeMo's own greedy decoding on in-memory audio (training-time evaluation; the reference uses transcribe())."""
    import torch

    was_training = model.training
    model.eval()
    texts = []
    try:
        with torch.no_grad():
            for i in range(0, len(audios), batch_size):
                x, xl = _pad_batch(audios[i : i + batch_size])
                _, _, enc, mask = model.forward(input_signal=x, input_signal_length=xl)
                dec = torch.tensor([prompt] * len(x), dtype=torch.long)
                hyps = model.decoding.decode_predictions_tensor(
                    encoder_hidden_states=enc, encoder_input_mask=mask, decoder_input_ids=dec,
                    return_hypotheses=False,
                )
                texts += [h.text if hasattr(h, "text") else str(h) for h in hyps]
    finally:
        model.train(was_training)
    return texts


def parse_timed(text: str) -> list[tuple[str, float]]:
    import re

    return [(m.group(2).strip(), int(m.group(1)) * FRAME_SECONDS)
            for m in re.finditer(r"<\|(\d+)\|>(.*?)<\|(\d+)\|>", text.strip()) if m.group(2).strip()]


def start_accuracy(ref_words: list[dict], hyp_words: list[tuple[str, float]], tol: float = 0.16) -> tuple[int, int]:
    """(reference words whose text is recognised with a start within ``tol`` s, reference words). Words are paired
    by an edit-distance alignment of the normalised texts."""
    ref = [normalize_words(w["word"])[0] for w in ref_words]
    hyp = [(normalize_words(t) or [""])[0] for t, _ in hyp_words]
    # alignment backtrace
    n, m = len(ref), len(hyp)
    d = np.zeros((n + 1, m + 1), int)
    d[:, 0] = np.arange(n + 1)
    d[0, :] = np.arange(m + 1)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            d[i, j] = min(d[i - 1, j] + 1, d[i, j - 1] + 1, d[i - 1, j - 1] + (ref[i - 1] != hyp[j - 1]))
    i, j, good = n, m, 0
    while i > 0 and j > 0:
        if d[i, j] == d[i - 1, j - 1] + (ref[i - 1] != hyp[j - 1]):
            if ref[i - 1] == hyp[j - 1] and abs(hyp_words[j - 1][1] - ref_words[i - 1]["start"]) <= tol:
                good += 1
            i, j = i - 1, j - 1
        elif d[i, j] == d[i - 1, j] + 1:
            i -= 1
        else:
            j -= 1
    return good, n


def evaluate(model, clips: list[Utterance], limit_per_lang: int | None = None, long_clips=()) -> dict:
    """WER per prompt and language on held-out clips, plus word-start accuracy for the timestamp prompt; WER on
    the 8-12 s ``long_clips`` (English, no punctuation) with and without timestamps."""
    out = {}
    for ts in (False, True):
        if not long_clips:
            break
        texts = greedy_texts(model, [c.audio for c in long_clips], prompt_ids(model, "en", False, ts))
        if ts:
            texts = [" ".join(w for w, _ in parse_timed(t)) for t in texts]
        out[f"wer_long_{'ts' if ts else 'nots'}"] = wer(
            [(" ".join(word_forms(c.sentences, False)), t) for c, t in zip(long_clips, texts)])
    for pname, p in HELDOUT_PROMPTS.items():
        pairs_all, good, total = [], 0, 0
        for lang in LANGS:
            sel = [c for c in clips if c.lang == lang][:limit_per_lang]
            texts = greedy_texts(model, [c.audio for c in sel], prompt_ids(model, lang, p["pnc"], p["timestamps"]))
            pairs = []
            for c, t in zip(sel, texts):
                ref = " ".join(word_forms(c.sentences, p["pnc"]))
                if p["timestamps"]:
                    hw = parse_timed(t)
                    g, n = start_accuracy(c.words, hw)
                    good, total = good + g, total + n
                    t = " ".join(w for w, _ in hw)
                pairs.append((ref, t))
            out[f"wer_{pname}_{lang}"] = wer(pairs)
            pairs_all += pairs
        out[f"wer_{pname}"] = wer(pairs_all)
        if p["timestamps"]:
            out["start_within_0.16s"] = good / max(1, total)
    return out


def train(model, sampler: TrainSampler, clips: list[Utterance], steps: int, log_path: Path, long_clips=()) -> dict:
    import torch

    hp = sampler.hp
    if hp.get("seed"):
        torch.manual_seed(SEED + 1)
        random.seed(SEED + 1)
    g = torch.Generator().manual_seed(SEED)
    frame_head = torch.nn.Linear(MODEL["dec_d"], model.tokenizer.vocab_size + 1)  # + silence
    with torch.no_grad():
        frame_head.weight.copy_(torch.randn(frame_head.weight.shape, generator=g) * MODEL["dec_d"] ** -0.5)
        frame_head.bias.zero_()
    decay, no_decay = [], []
    for name, p in list(model.named_parameters()) + [("frame_head.weight", frame_head.weight),
                                                     ("frame_head.bias", frame_head.bias)]:
        (no_decay if p.ndim < 2 or "norm" in name or "pos_bias" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": hp["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=hp["lr"], betas=(0.9, 0.98), eps=1e-8,
    )
    model.train()
    sampler.warmup = hp["short_steps"] > 0
    stream = batches(sampler, model)
    t0 = time.time()
    history = []
    running, seen_audio = [], 0.0
    with open(log_path, "a") as logf:
        for step in range(steps):
            batch = next(stream)
            sampler.warmup = step < hp["short_steps"]  # takes effect with the next pool of utterances
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, hp)
            loss, ce, aux, attn = loss_on_batch(model, frame_head, batch, hp)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(frame_head.parameters()), hp["clip"])
            opt.step()
            running.append((ce, aux, attn))
            seen_audio += sum(len(b[0].audio) for b in batch) / SAMPLE_RATE
            if (step + 1) % 50 == 0:
                ce_mean, aux_mean, attn_mean = np.mean(running, axis=0)
                msg = (f"step {step + 1}/{steps} ce {ce_mean:.4f} frames {aux_mean:.3f} attn {attn_mean:.3f} lr {lr_at(step, steps, hp):.2e} "
                       f"audio {seen_audio / 3600:.2f} h, {time.time() - t0:.0f} s")
                log(msg)
                logf.write(msg + "\n")
                logf.flush()
                running = []
            if (step + 1) % hp["eval_every"] == 0 or step + 1 == steps:
                scores = evaluate(model, clips, limit_per_lang=None if step + 1 == steps else 12, long_clips=long_clips)
                scores.update(step=step + 1, seconds=round(time.time() - t0, 1))
                history.append(scores)
                msg = "eval " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()})
                log(msg)
                logf.write(msg + "\n")
                logf.flush()
    return {"train_seconds": round(time.time() - t0, 1), "audio_hours": round(seen_audio / 3600, 2),
            "history": history}


# --------------------------------------------------------------------------------------------------------------
# NeMo reference on the restored .nemo, conversion, shipped files.


def round_to_float16(model) -> None:
    """Make every float weight exactly representable in float16, so the shipped float16 file holds exactly the
    weights NeMo ran (the tests then expect identical tokens, not merely close ones)."""
    import torch

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.dtype == torch.float32:
                t.copy_(t.half().float())


def write_wav(path: Path, samples_int16: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(samples_int16.astype("<i2").tobytes())


def nemo_reference(nemo_path: Path, clips: list[Utterance], bank, work: Path) -> dict:
    """NeMo's transcribe() (B=1, files, as in tests/nemo_oracle.py) on every held-out clip and prompt."""
    import torch

    from nemo.collections.asr.models import EncDecMultiTaskModel

    reset_restore_state()
    model = EncDecMultiTaskModel.restore_from(str(nemo_path), map_location="cpu")
    model.eval()
    wav_dir = work / "heldout_wavs"
    wav_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, c in enumerate(clips):
        samples, _ = compose(c.parts, bank[c.voice])
        p = wav_dir / f"{i:04d}.wav"
        write_wav(p, samples)
        paths.append(str(p))
    results = {}
    prompts = {}
    for pname, p in HELDOUT_PROMPTS.items():
        for lang in LANGS:
            idx = [i for i, c in enumerate(clips) if c.lang == lang]
            with torch.no_grad():
                hyps = model.transcribe(
                    [paths[i] for i in idx], batch_size=1, return_hypotheses=True, verbose=False, num_workers=0,
                    source_lang=lang, target_lang=lang, pnc="yes" if p["pnc"] else "no", timestamps=p["timestamps"],
                )
            model.eval()  # NeMo leaves the decoder in train mode after transcribe()
            prompts[f"{pname}/{lang}"] = prompt_ids(model, lang, p["pnc"], p["timestamps"])
            for i, h in zip(idx, hyps):
                rec = {"tokens": [int(t) for t in h.y_sequence.tolist()], "text": h.text}
                ts = getattr(h, "timestamp", None)
                if p["timestamps"]:
                    words = ts.get("word", []) if isinstance(ts, dict) else []
                    rec["words"] = [{"text": w["word"], "start": float(w["start"]), "end": float(w["end"])}
                                    for w in words]
                results.setdefault(i, {})[pname] = rec
    del model
    reset_restore_state()
    return {"prompts": prompts, "results": results}


def score_reference(clips: list[Utterance], ref: dict) -> dict:
    out = {}
    for pname, p in HELDOUT_PROMPTS.items():
        pairs_all, good, total = [], 0, 0
        for lang in LANGS:
            pairs = []
            for i, c in enumerate(clips):
                if c.lang != lang:
                    continue
                r = ref["results"][i][pname]
                if p["timestamps"]:
                    g, n = start_accuracy(c.words, [(w["text"], w["start"]) for w in r["words"]])
                    good, total = good + g, total + n
                pairs.append((" ".join(word_forms(c.sentences, p["pnc"])), r["text"]))
            out[f"wer_{pname}_{lang}"] = wer(pairs)
            pairs_all += pairs
        out[f"wer_{pname}"] = wer(pairs_all)
        if p["timestamps"]:
            out["start_within_0.16s"] = good / max(1, total)
    out["wer"] = wer([
        (" ".join(word_forms(c.sentences, p["pnc"])), ref["results"][i][pname]["text"])
        for pname, p in HELDOUT_PROMPTS.items() for i, c in enumerate(clips)
    ])
    return out


def clip_record(i: int, c: Utterance) -> dict:
    return {
        "name": f"{c.lang}_{i:03d}",
        "lang": c.lang,
        "voice": c.voice,
        "parts": c.parts,
        "sentences": c.sentences,
        "reference": {"pnc": " ".join(word_forms(c.sentences, True)),
                      "nopnc": " ".join(word_forms(c.sentences, False))},
        "words": [{"text": w["word"], "start": round(w["start"], 6), "end": round(w["end"], 6)} for w in c.words],
    }


def _file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export(nemo_path: Path, out: Path, cache: Path, clips: list[Utterance], long_utt: Utterance, bank,
           summary: dict) -> dict:
    if str(REPO) not in sys.path:  # run from a clone without installing the package
        sys.path.insert(0, str(REPO))
    from mlx_canary.convert import convert

    work = Path(tempfile.mkdtemp(prefix="demo_export_", dir=cache))
    try:
        log("NeMo reference: transcribe() on the held-out clips from the restored .nemo")
        ref = nemo_reference(nemo_path, clips, bank, work)
        scores = score_reference(clips, ref)
        log("NeMo scores " + json.dumps({k: round(v, 4) for k, v in scores.items()}))

        log("converting with mlx_canary.convert (float16 storage)")
        conv_dir = work / "converted"
        info = convert(nemo_path, conv_dir, dtype="float16", progress=lambda m: None)
        cfg = json.loads((conv_dir / "config.json").read_text())
        # The weights are float16 values (round_to_float16), stored losslessly; computing in float32 by default
        # keeps the tokens NeMo's.
        cfg["dtype"] = "float32"
        cfg["model_name"] = "canary-demo"
        # Long inputs: chunks of the length the model was made for, not NeMo's 30-40 s (never trained).
        cfg["decoding"]["chunk_seconds"] = LONG_CHUNK_SECONDS
        # One id per word: NeMo's token merge would find spurious matches far outside the 1 s overlap; merge the
        # chunks by their predicted timestamps instead (config.py, DecodingConfig.chunk_merge).
        cfg["decoding"]["chunk_merge"] = "timestamps"
        cfg["source"] = "scripts/train_demo_model.py"
        (conv_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

        out.mkdir(parents=True, exist_ok=True)
        for old in out.iterdir():
            if old.is_file() and old.name != "README.md":
                old.unlink()
        for f in conv_dir.iterdir():
            shutil.copy2(f, out / f.name)

        # The held-out audio is not shipped: the tests rebuild the word clips with espeak-ng and check them
        # against these hashes (the NeMo tokens below are only comparable on identical samples).
        held = {v.key: v for lang in LANGS for v in heldout_voices(lang)}
        voices = {k: {"lang": v.lang, "voice": v.voice, "variant": v.variant, "speed": v.speed, "pitch": v.pitch,
                      "sha256": bank_sha256(bank[k], VOCAB[v.lang])} for k, v in held.items()}
        sample_idx = next(i for i, c in enumerate(clips) if c.lang == "en" and len(c.sentences[0]) >= 5)
        samples, _ = compose(clips[sample_idx].parts, bank[clips[sample_idx].voice])
        write_wav(out / "sample.wav", samples)

        records = []
        for i, c in enumerate(clips):
            rec = clip_record(i, c)
            rec["nemo"] = ref["results"][i]
            records.append(rec)
        long_rec = clip_record(0, long_utt)
        long_rec["name"] = "en_long"
        reference = {
            "format_version": FORMAT_VERSION,
            "what": "NeMo 3.0 transcribe() (batch 1, greedy) on the held-out clips, from the .nemo the demo model "
                    "was converted from. Clip audio = parts joined: ['sil', n] is n zero samples, ['w', word] is "
                    "the clip of that word in the clip's voice (scripts/train_demo_model.py synthesize_word, int16 "
                    "16 kHz; voices[voice].sha256 hashes a voice's clips); float samples = int16 / 32768.",
            "sample_rate": SAMPLE_RATE,
            "espeak_ng": espeak_version(),
            "voices": voices,
            "prompts": HELDOUT_PROMPTS,
            "prompt_ids": ref["prompts"],
            "frame_seconds": FRAME_SECONDS,
            "scores": scores,
            "sample": {"file": "sample.wav", "clip": records[sample_idx]["name"],
                       "text": records[sample_idx]["reference"]["pnc"]},
            "clips": records,
            "long": dict(long_rec, chunk_seconds=LONG_CHUNK_SECONDS,
                         duration=round(len(compose(long_utt.parts, bank[long_utt.voice])[0]) / SAMPLE_RATE, 3)),
        }
        (out / "nemo_reference.json").write_text(json.dumps(reference, ensure_ascii=False, indent=0) + "\n")

        demo = dict(summary)
        demo.update(
            model_name="canary-demo",
            languages=list(LANGS),
            vocabulary={k: v for k, v in VOCAB.items()},
            chunk_seconds=LONG_CHUNK_SECONDS,
            max_training_seconds=TRAIN["max_seconds"],
            heldout_scores_nemo={k: round(v, 4) for k, v in scores.items()},
            parameters=info.num_parameters,
            nemo_sha256=_file_sha256(nemo_path),
            size_bytes=sum(p.stat().st_size for p in out.iterdir() if p.is_file()),
            model_size_bytes=sum((out / n).stat().st_size for n in ("model.safetensors",)),
        )
        (out / "demo.json").write_text(json.dumps(demo, ensure_ascii=False, indent=1) + "\n")
        return demo
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------


def restore(path: Path):
    from nemo.collections.asr.models import EncDecMultiTaskModel

    reset_restore_state()
    model = EncDecMultiTaskModel.restore_from(str(path), map_location="cpu")
    reset_restore_state()
    return model


def finish_stage(model, clips, long_clips, path: Path) -> dict:
    """Round the weights to float16 values (the shipped storage), score, save ``path``."""
    round_to_float16(model)
    after = evaluate(model, clips, long_clips=long_clips)
    log("after float16 rounding " + json.dumps({k: round(v, 4) for k, v in after.items()}))
    model.eval()
    model.save_to(str(path))
    log(f"saved {path}")
    return after


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the converted model and references go")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="word banks, .nemo, logs (not shipped)")
    ap.add_argument("--steps", type=int, default=TRAIN["steps"], help="stage 1 steps")
    ap.add_argument("--long-steps", type=int, default=LONG_TUNE["steps"], help="stage 2 (long utterances) steps")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest on a shared 2-core machine: OpenMP threads spin-wait)")
    ap.add_argument("--from-stage1", action="store_true", help="reuse <cache>/stage1.nemo: stage 2 and export only")
    ap.add_argument("--skip-training", action="store_true", help="reuse <cache>/demo.nemo: export only")
    ap.add_argument("--no-export", action="store_true", help="train and save the .nemo only")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    # Sharp attention leaves subnormal probabilities; x86 arithmetic on them is ~100x slower.
    torch.set_flush_denormal(True)
    random.seed(SEED)
    np.random.seed(SEED % 2**32)
    torch.manual_seed(SEED)
    quiet_nemo()

    cache = args.cache.expanduser().absolute()
    cache.mkdir(parents=True, exist_ok=True)
    stage1_path = cache / "stage1.nemo"
    nemo_path = cache / "demo.nemo"
    summary_path = cache / "train_summary.json"
    t_start = time.time()

    voices = {lang: train_voices(lang) for lang in LANGS}
    held = {lang: heldout_voices(lang) for lang in LANGS}
    bank = build_bank([v for lang in LANGS for v in voices[lang] + held[lang]], cache)
    t_corpus = time.time() - t_start

    clips = [realize(c, bank) for c in heldout_clips()]
    long_utt = realize(long_recording(bank), bank)
    long_clips = [realize(c, bank) for c in grouped_sentences(long_utt, bank)]
    exclude = {tuple(c.sentences[0]) for c in clips} | {tuple(s) for s in long_utt.sentences}

    summary = {"seed": SEED, "espeak_ng": espeak_version(), "torch": torch.__version__, "threads": args.threads,
               "model": MODEL, "train": dict(TRAIN, steps=args.steps),
               "long_tune": dict(LONG_TUNE, steps=args.long_steps), "corpus_seconds": round(t_corpus, 1)}
    if args.skip_training or args.from_stage1:
        if summary_path.exists():
            summary.update({k: v for k, v in json.loads(summary_path.read_text()).items()
                            if k in ("stage1", "stage2", "corpus_seconds")})
    if not args.skip_training and not args.from_stage1:
        log("stage 1: utterances up to 12 s")
        with tempfile.TemporaryDirectory(prefix="demo_tok_", dir=cache) as work:
            model = build_model(Path(work), SEED)
            n_params = sum(p.numel() for p in model.parameters())
            log(f"model: {n_params / 1e6:.2f} M parameters, vocabulary {model.tokenizer.vocab_size}")
            sampler = TrainSampler(voices, bank, exclude, SEED)
            summary["stage1"] = train(model, sampler, clips, args.steps, cache / "train.log", long_clips)
            summary["stage1"]["after_float16"] = finish_stage(model, clips, long_clips, stage1_path)
            del model
        summary_path.write_text(json.dumps(summary, indent=1, default=str))
    if not args.skip_training:
        if not stage1_path.exists():
            raise SystemExit(f"{stage1_path} does not exist; run without --from-stage1")
        log("stage 2: longer utterances (up to 16 s), from stage1.nemo")
        model = restore(stage1_path)
        sampler = TrainSampler(voices, bank, exclude, SEED, LONG_TUNE)
        summary["stage2"] = train(model, sampler, clips, args.long_steps, cache / "train.log", long_clips)
        summary["stage2"]["after_float16"] = finish_stage(model, clips, long_clips, nemo_path)
        del model
        summary_path.write_text(json.dumps(summary, indent=1, default=str))
    if not nemo_path.exists():
        raise SystemExit(f"{nemo_path} does not exist; run without --skip-training")
    if not args.no_export:
        demo = export(nemo_path, args.out, cache, clips, long_utt, bank, summary)
        log(f"wrote {args.out}: {demo['size_bytes'] / 2**20:.1f} MiB; NeMo held-out WER "
            f"{demo['heldout_scores_nemo']['wer'] * 100:.2f} %")
    log(f"total {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
