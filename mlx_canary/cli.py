"""The ``mlx-canary`` command line: ``convert``, ``transcribe``, ``translate`` and ``serve``, a thin layer over the API.

Exit status: 0 on success; 1 when any input failed or on a ``CanaryError`` (printed as one ``error: ...`` line,
no traceback); 2 for usage errors; 130 when interrupted. A failing input does not stop the others: failures
are listed at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import _blas, hub, writers
from . import audio as audio_io
from .conversion import convert
from .errors import CanaryError
from .loading import DEMO_MODEL_DIR, load_model
from .listen import add_listen_arguments, list_devices, listen
from .options import TranscribeOptions
from .scheduler import Job, Scheduler
from .streaming_policy import POLICIES, StreamingOptions
from .server import ConnectionLimits, serve  # FastAPI itself is imported only when serving (the optional extra)
from .transcribe import AlignmentWarning, LanguageFallbackWarning, batch_order, lookahead_inputs, read_ahead

DTYPE_CHOICES = ("float32", "float16", "bfloat16")
DEFAULT_MODEL = "nvidia/canary-1b-flash"
QUANTIZE_BITS = (8, 4)
GROUP_SIZES = (32, 64, 128)


@dataclass
class _Input:
    label: str  # as the user named it (or the file found in a named directory)
    source: Any  # a Path, or "-" for stdin
    stem: str = ""  # output file name without extension
    subdir: str = ""  # folder under the output directory (--recursive mirrors the input tree)
    error: Optional[str] = None  # set when the input failed
    number: int = 0  # 1-based position among the inputs to transcribe (progress display)


@dataclass
class _Run:
    inputs: list = field(default_factory=list)

    @property
    def failed(self) -> list:
        return [item for item in self.inputs if item.error is not None]


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- argument parsing ------------------------------------------------------------------------------------


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _channel_index(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a channel index (0 for the first channel), got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"channels count from 0, got {number}")
    return number


def _non_negative_float(value: str) -> float:
    number = _finite_float(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return number


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return number


def _chunk_length(value: str) -> float:
    """``--chunk-length``: seconds, 0 for no chunking (the model checks the lower bound of a chunk)."""
    number = _finite_float(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (no chunking) or a positive number of seconds, got {value}")
    return number


def _formats(value: str) -> list:
    try:
        return writers.expand_formats(value)
    except CanaryError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_verbosity(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true",
                       help="print progress (as lines when stderr is not a terminal), timings and the BLAS in use")
    group.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors (no progress bar)")


def _finite_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value}")
    return number


def _default_model() -> str:
    return os.environ.get("MLX_CANARY_MODEL") or DEFAULT_MODEL


def _add_quantize(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--quantize", type=int, choices=QUANTIZE_BITS, default=None, metavar="BITS",
                        help=f"quantize {what} to 8 or 4 bits (Linear and embedding weights; default: no)")
    parser.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=None, metavar="N",
                        help="quantization group size: 32, 64 or 128 (default: 64; needs --quantize)")


def _add_speech_arguments(parser: argparse.ArgumentParser, translate: bool, demo: bool = False) -> None:
    if demo:
        parser.add_argument("audio", nargs="*", metavar="AUDIO",
                            help="audio files (default: the bundled sample, an English sentence)")
    else:
        parser.add_argument(
            "audio", nargs="*", metavar="AUDIO",
            help="audio or video files, directories (their audio/video files are used), or - for stdin",
        )
    parser.add_argument(
        "-r", "--recursive", action="store_true",
        help="search directories recursively; outputs mirror each directory's tree under the output directory "
        "(OUT/sub/x.txt for DIR/sub/x.wav), so their names do not depend on what else is transcribed",
    )
    parser.add_argument(
        "-m", "--model", default="demo" if demo else _default_model(),
        help="converted model directory, .nemo file, Hugging Face repo id, or demo (the bundled tiny model); a "
        "NeMo repo's .nemo is downloaded and converted once, then reused from the cache ($MLX_CANARY_CACHE, "
        "default ~/.cache/mlx-canary) "
        + ("(default: demo)" if demo else f"(default: $MLX_CANARY_MODEL, else {DEFAULT_MODEL})"),
    )
    parser.add_argument("-s", "--source-lang", default=None, metavar="LANG",
                        help="language spoken (default: the model's default language, en for Canary), or auto to "
                        "identify it per input (experimental: unidentified inputs fall back to the default, with a "
                        "warning)")
    if translate:
        parser.add_argument("-t", "--target-lang", required=True, metavar="LANG", help="language of the output text")
    else:
        parser.add_argument(
            "-t", "--target-lang", default=None, metavar="LANG",
            help="language of the output text (default: the source language)",
        )
    parser.add_argument(
        "--pnc", action=argparse.BooleanOptionalAction, default=True,
        help="punctuation and capitalization in the output (default: on)",
    )
    parser.add_argument("--timestamps", action="store_true", help="word and segment timestamps (srt/vtt/tsv/json)")
    parser.add_argument("-b", "--batch-size", type=_positive_int, default=None, metavar="N",
                        help=f"inputs (or chunks of a long input) decoded together (default: {TranscribeOptions.batch_size})")
    parser.add_argument("--beam-size", type=_positive_int, default=None, metavar="N",
                        help="beam search width; 1 is greedy (default: the model's setting)")
    parser.add_argument("--len-pen", type=_finite_float, default=None, metavar="X",
                        help="beam search length penalty (default: the model's setting)")
    parser.add_argument("--chunk-length", type=_chunk_length, default=None, metavar="SECONDS",
                        help="split inputs longer than this into overlapping chunks of this length (more than 2; "
                        "0: never chunk, NeMo's single pass; default: the model config's decoding.chunk_seconds, "
                        "else NeMo's 30-40 s plan)")
    parser.add_argument("--channel", type=_channel_index, default=None, metavar="N",
                        help="use only channel N of multi-channel audio, counting from 0 (NeMo's channel_selector; "
                        "default: the mean of all channels)")
    parser.add_argument(
        "-f", "--output-format", type=_formats, default=["txt"], metavar="FORMAT",
        help="txt, srt, vtt, json, tsv, a comma-separated list of them, or all (default: txt)",
    )
    parser.add_argument("-o", "--output-dir", default=".", metavar="DIR",
                        help="where OUT/<audio name>.<format> files go (default: current directory)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                        help="compute dtype (default: float32 on the CPU; on a GPU bfloat16, or the half precision "
                        "the model was converted to)")
    _add_quantize(parser, "the model as it loads")
    _add_verbosity(parser)
    _add_corpus_arguments(parser)


def _add_corpus_arguments(parser: argparse.ArgumentParser) -> None:
    corpus = parser.add_argument_group(
        "corpus jobs", "a NeMo manifest or a folder tree in, OUT/<name>_predictions.jsonl out; resumable: "
        "re-run the same command after a crash and finished items are skipped")
    corpus.add_argument("--manifest", default=None, metavar="PATH",
                        help="a NeMo manifest (JSON lines: audio_filepath, duration, optional offset, source_lang, "
                        "target_lang, pnc, text/answer) or a folder (searched recursively)")
    corpus.add_argument("--decode-workers", type=_positive_int, default=2, metavar="N",
                        help="threads decoding audio ahead of the model (default: 2)")
    corpus.add_argument("--ray", default=None, metavar="ADDRESS",
                        help="run the job on a Ray cluster (auto: the cluster this machine belongs to, or HOST:PORT "
                        "of its head); one model per worker; needs the ray extra")
    corpus.add_argument("--ray-workers", type=_positive_int, default=None, metavar="N",
                        help="Ray workers (models) to start (default: one per machine of the cluster)")
    corpus.add_argument("--normalize", default="", metavar="LIST",
                        help="text normalisation for WER, as NeMo's cal_write_wer: a comma-separated list of clean "
                        "(reference: clean_groundtruth_text), punctuation (ignore_punctuation), punct-space "
                        "(strip_punc_space), case (ignore_capitalization); default: none")


def _add_streaming_arguments(parser: argparse.ArgumentParser, live: bool) -> None:
    """Streaming decoding (NeMo's Wait-k / AlignAtt): the policy and the window [left | chunk | right]."""
    defaults = StreamingOptions()
    if live:
        parser.add_argument("--streaming", choices=POLICIES, default="alignatt", metavar="POLICY",
                            help="streaming policy: alignatt (default) or waitk")
    else:
        parser.add_argument("--streaming", choices=POLICIES, default=None, metavar="POLICY",
                            help="decode as a live stream would (NeMo's streaming decoding): waitk or alignatt; "
                            "segments are caption lines as they became final")
    parser.add_argument("--chunk-secs", type=_positive_float, default=1.0 if live else None, metavar="S",
                        help=f"audio decided per step (default: {1.0 if live else defaults.chunk_secs:g})")
    parser.add_argument("--left-context-secs", type=_non_negative_float, default=None, metavar="S",
                        help=f"audio kept before each chunk (default: {defaults.left_context_secs:g})")
    parser.add_argument("--right-context-secs", type=_non_negative_float, default=0.5 if live else None, metavar="S",
                        help=f"look-ahead after each chunk, added latency (default: {0.5 if live else defaults.right_context_secs:g})")
    parser.add_argument("--history", choices=("all", "window"), default=None,
                        help="decoder prefix: all tokens (NeMo's) or only those of audio still in the window (a "
                        "remedy for AlignAtt going silent on long continuous speech, NeMo issue #15231)")


def _streaming_options(args: argparse.Namespace) -> Optional[StreamingOptions]:
    if args.streaming is None:
        for flag, value in (("--chunk-secs", args.chunk_secs), ("--left-context-secs", args.left_context_secs),
                            ("--right-context-secs", args.right_context_secs), ("--history", args.history)):
            if value is not None:
                raise CanaryError(f"{flag} only applies with --streaming waitk|alignatt")
        return None
    named = {"chunk_secs": args.chunk_secs, "left_context_secs": args.left_context_secs,
             "right_context_secs": args.right_context_secs, "history": args.history}
    return StreamingOptions(policy=args.streaming, **{k: v for k, v in named.items() if v is not None})


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(
        prog="mlx-canary",
        description="NVIDIA Canary speech recognition and translation on Apple MLX.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    convert = sub.add_parser(
        "convert", help="convert a NeMo Canary checkpoint to an MLX model directory",
        description="Convert a NeMo Canary .nemo checkpoint, or a Canary-Qwen (SALM) checkpoint directory as "
        "SALM.save_pretrained writes it (a path or a Hugging Face repo id), to an MLX model directory that "
        "transcribe/translate and mlx_canary.load_model use.",
    )
    convert.add_argument("source", metavar="SOURCE",
                         help=".nemo file, SALM checkpoint directory, or Hugging Face repo id (e.g. "
                         "nvidia/canary-1b-flash, nvidia/canary-qwen-2.5b)")
    convert.add_argument("out_dir", metavar="OUT_DIR", help="model directory to create")
    convert.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32",
                         help="dtype of the stored weights (default: float32)")
    convert.add_argument("--overwrite", action="store_true",
                         help="replace OUT_DIR if it holds an mlx-canary model and nothing else (anything else, "
                         "and the SOURCE, is never deleted: the conversion is refused)")
    _add_quantize(convert, "the stored weights")
    convert.add_argument("--upload-repo", default=None, metavar="ORG/NAME",
                         help="then publish OUT_DIR to this Hugging Face repo, with a generated model card "
                         "(needs a token with write access: `hf auth login` or HF_TOKEN)")
    _add_verbosity(convert)
    convert.set_defaults(func=_cmd_convert)

    transcribe = sub.add_parser(
        "transcribe", help="speech to text in the spoken language",
        description="Transcribe audio files; writes DIR/<audio name>.<format> for each input (-o DIR).",
    )
    _add_speech_arguments(transcribe, translate=False)
    _add_streaming_arguments(transcribe, live=False)
    transcribe.set_defaults(func=_cmd_speech, task="transcribe")

    translate = sub.add_parser(
        "translate", help="speech in one language to text in another",
        description="Translate speech into --target-lang text; writes DIR/<audio name>.<format> (-o DIR).",
    )
    _add_speech_arguments(translate, translate=True)
    _add_streaming_arguments(translate, live=False)
    translate.set_defaults(func=_cmd_speech, task="translate")

    listen_cmd = sub.add_parser(
        "listen", help="live captions from the microphone (or a file played in real time)",
        description="Live captions: the final text is printed as it is decided; Ctrl-C stops and writes the "
        "transcript (-f txt,srt,vtt,json) to -o DIR. Needs PortAudio for the microphone: pip install sounddevice.",
    )
    add_listen_arguments(listen_cmd)
    listen_cmd.add_argument("-m", "--model", default=_default_model(), help="model (as for transcribe)")
    listen_cmd.add_argument("-s", "--source-lang", default=None, metavar="LANG",
                            help="language spoken (default: the model's default language)")
    listen_cmd.add_argument("-t", "--target-lang", default=None, metavar="LANG",
                            help="write this language instead (speech translation)")
    listen_cmd.add_argument("--pnc", action=argparse.BooleanOptionalAction, default=True,
                            help="punctuation and capitalization (default: on)")
    listen_cmd.add_argument("-f", "--output-format", type=_formats, default=["txt"], metavar="FORMAT",
                            help="formats written when listening stops (default: txt)")
    listen_cmd.add_argument("-o", "--output-dir", default=".", metavar="DIR", help="where they go (default: .)")
    listen_cmd.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="compute dtype")
    _add_streaming_arguments(listen_cmd, live=True)
    _add_quantize(listen_cmd, "the model as it loads")
    _add_verbosity(listen_cmd)
    listen_cmd.set_defaults(func=_cmd_listen, task="listen")

    demo = sub.add_parser(
        "demo", help="transcribe the bundled sample with the bundled demo model (offline, nothing to download)",
        description="Transcribe with the tiny demo model shipped in the package (a Canary trained on espeak-ng "
        "speech: a small vocabulary in en/de/es/fr, see docs/demo-model.md); without AUDIO, its bundled sample. "
        "Same options and outputs as transcribe.",
    )
    _add_speech_arguments(demo, translate=False, demo=True)
    _add_streaming_arguments(demo, live=False)
    demo.set_defaults(func=_cmd_speech, task="transcribe")

    ask = sub.add_parser(
        "ask", help="ask a speech-LLM (canary-qwen-2.5b) about a transcript or an audio file",
        description="The LLM-only mode of a speech-LLM (its adapter off, as NeMo documents): transcribe AUDIO "
        "first (or read a .txt transcript, or take the text itself), then print the LLM's answer to QUESTION about "
        "it (greedy).",
    )
    ask.add_argument("source", metavar="TRANSCRIPT_OR_AUDIO",
                     help="an audio file, a .txt file holding a transcript, or the transcript text itself")
    ask.add_argument("question", metavar="QUESTION", help='e.g. "Summarize this in one sentence."')
    ask.add_argument("-m", "--model", default=os.environ.get("MLX_CANARY_MODEL"),
                     help="a converted speech-LLM directory, its checkpoint or repo id (default: $MLX_CANARY_MODEL)")
    ask.add_argument("--max-new-tokens", type=_positive_int, default=None, metavar="N",
                     help="longest answer in tokens (default: the model config's max_new_tokens)")
    ask.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="compute dtype (default: per device)")
    _add_verbosity(ask)
    ask.set_defaults(func=_cmd_ask)

    align = sub.add_parser(
        "align", help="time a transcript you already have against its audio (forced alignment)",
        description="Forced alignment: word and segment times of TEXT in AUDIO, found by the model's CTC aligner "
        "exactly as NeMo times its own transcripts on canary-1b-v2 (segments end at . ? !). For subtitles to "
        "re-time or a script read aloud. Needs a model that carries an aligner (canary-1b-v2). Writes "
        "DIR/<audio name>.<format>.",
    )
    align.add_argument("audio", metavar="AUDIO", help="the audio or video file")
    align.add_argument("text", metavar="TEXT_OR_FILE",
                       help="the transcript: a text file (.txt; of a .srt or .vtt file its cue text), - for stdin, "
                       "or the text itself")
    align.add_argument("-m", "--model", default=_default_model(),
                       help=f"a model with an aligner (default: $MLX_CANARY_MODEL, else {DEFAULT_MODEL})")
    align.add_argument("--channel", type=_channel_index, default=None, metavar="N",
                       help="use only channel N of multi-channel audio (default: the mean of all channels)")
    align.add_argument("-f", "--output-format", type=_formats, default=["srt"], metavar="FORMAT",
                       help="srt, vtt, json, tsv, txt, a comma-separated list of them, or all (default: srt)")
    align.add_argument("-o", "--output-dir", default=".", metavar="DIR",
                       help="where OUT/<audio name>.<format> files go (default: current directory)")
    align.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="compute dtype (default: per device)")
    _add_verbosity(align)
    align.set_defaults(func=_cmd_align)

    serve = sub.add_parser(
        "serve", help="serve an OpenAI-compatible transcription API over HTTP",
        description="Serve POST /v1/audio/transcriptions and /v1/audio/translations (OpenAI's API), "
        "GET /v1/models and GET /health, with one model loaded once. Needs the server extra: "
        "pip install 'mlx-canary[server]'.",
    )
    serve.add_argument(
        "-m", "--model", default=os.environ.get("MLX_CANARY_MODEL"),
        help="converted model directory, .nemo file or Hugging Face repo id (default: $MLX_CANARY_MODEL)",
    )
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: 127.0.0.1, this machine only; "
                       "0.0.0.0 listens on every interface)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    serve.add_argument("--max-upload-mb", type=_positive_float, default=25.0, metavar="N",
                       help="largest accepted upload in MB (default: 25, OpenAI's limit)")
    serve.add_argument("--max-batch-size", type=_positive_int, default=8, metavar="N",
                       help="most waiting requests decoded together in one batch (default: 8)")
    serve.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                       help="compute dtype (default: float32 on the CPU; on a GPU bfloat16, or the half precision "
                       "the model was converted to)")
    serve.add_argument("--api-key", default=os.environ.get("MLX_CANARY_API_KEY"), metavar="KEY",
                       help="require 'Authorization: Bearer KEY' on /v1 requests (default: $MLX_CANARY_API_KEY, "
                       "which keeps the key out of the process list; unset: no authentication)")
    serve.add_argument("--read-timeout", type=_positive_float, default=30.0, metavar="S",
                       help="longest wait for a request's headers, or for the next part of its upload, before the "
                       "connection is dropped (default: 30)")
    serve.add_argument("--upload-timeout", type=_positive_float, default=300.0, metavar="S",
                       help="longest time one upload may take in all; slower ones are answered 408 (default: 300)")
    serve.add_argument("--max-connections", type=_positive_int, default=64, metavar="N",
                       help="open connections served at once; requests beyond are answered 503 (default: 64)")
    serve.add_argument("--max-streams", type=_positive_int, default=8, metavar="N",
                       help="live WebSocket streams at once; one more is closed with code 1013 (default: 8)")
    serve.add_argument("--stream-idle-timeout", type=_positive_float, default=30.0, metavar="S",
                       help="a live stream that sends no audio for this long is closed (default: 30)")
    _add_verbosity(serve)
    serve.set_defaults(func=_cmd_serve)
    return parser


# -- convert ---------------------------------------------------------------------------------------------


class _Progress:
    """Progress callback for ``convert``: accepts a message, ``(done, total)``, or ``(message, done, total)``."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._open_line = False

    def __call__(self, *args, **kwargs) -> None:
        if not self.enabled:
            return
        numbers = [a for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]
        words = [str(a) for a in args if not isinstance(a, (int, float)) or isinstance(a, bool)]
        words += [f"{k}={v}" for k, v in kwargs.items()]
        if len(numbers) == 2 and sys.stderr.isatty():
            done, total = numbers
            sys.stderr.write(f"\r{' '.join(words)} {done}/{total}".lstrip())
            self._open_line = done < total
            if not self._open_line:
                sys.stderr.write("\n")
            sys.stderr.flush()
            return
        if len(numbers) == 2:
            done, total = numbers
            if done not in (0, total):
                return  # not a terminal: print the start and the end of each step only
            words.append(f"{done}/{total}")
        else:
            words += [str(n) for n in numbers]
        self.finish()
        _say(" ".join(words))

    def finish(self) -> None:
        if self._open_line:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._open_line = False


def _human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"  # pragma: no cover


def _summary_items(summary: Any) -> list:
    if summary is None:
        return []
    if dataclasses.is_dataclass(summary) and not isinstance(summary, type):
        summary = dataclasses.asdict(summary)
    elif hasattr(summary, "to_dict"):
        summary = summary.to_dict()
    elif not isinstance(summary, dict) and hasattr(summary, "__dict__"):
        summary = {k: v for k, v in vars(summary).items() if not k.startswith("_")}
    if not isinstance(summary, dict):
        return [("result", summary)]
    items = []
    for key, value in summary.items():
        if key.endswith("bytes") and isinstance(value, (int, float)):
            value = f"{_human_size(value)} ({value:,} bytes)"
        elif key in ("parameters", "params", "num_parameters") and isinstance(value, int):
            value = f"{value:,}"
        elif isinstance(value, (list, tuple)):
            value = ", ".join(map(str, value))
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        items.append((key.replace("_", " "), value))
    return items


def _quantize_options(args: argparse.Namespace) -> dict:
    if args.group_size is not None and args.quantize is None:
        raise CanaryError("--group-size only applies with --quantize 8 or --quantize 4")
    if args.quantize is None:
        return {}
    return {"quantize": args.quantize, "group_size": args.group_size or 64}


def _cmd_convert(args: argparse.Namespace) -> int:
    quantize = _quantize_options(args)
    if args.upload_repo is not None:
        # Checked before converting: a bad repo id must not cost a conversion first.
        hub.check_repo_id(args.upload_repo)
    progress = _Progress(enabled=not args.quiet)
    if args.verbose:
        _say(_blas.blas_status())
    try:
        summary = convert(args.source, args.out_dir, dtype=args.dtype, overwrite=args.overwrite, progress=progress,
                          **quantize)
    finally:
        progress.finish()
    if not args.quiet:
        if not isinstance(summary, dict) and type(summary).__str__ is not object.__str__:
            print(summary)  # the converter's own rendering
        else:
            items = _summary_items(summary)
            width = max((len(k) for k, _ in items), default=0)
            print(f"converted {args.source} -> {args.out_dir}")
            for key, value in items:
                print(f"  {key:<{width}}  {value}")
        sys.stdout.flush()
    if args.upload_repo is not None:
        if not args.quiet:
            _say(f"uploading {args.out_dir} to Hugging Face repo {args.upload_repo}")
        url = hub.upload_model(args.out_dir, args.upload_repo)
        if not args.quiet:
            print(f"uploaded to {url}")
    return 0


# -- transcribe / translate --------------------------------------------------------------------------------


def _expand_inputs(names: list, recursive: bool = False) -> _Run:
    run = _Run()
    stdin_used = False
    seen: set = set()  # a file named twice (directly and through its directory) is transcribed once
    for name in names:
        if name == "-":
            if stdin_used:
                raise CanaryError("'-' (stdin) can be given only once")
            stdin_used = True
            run.inputs.append(_Input("<stdin>", "-", "stdin"))
            continue
        path = Path(name)
        if path.is_dir():
            found = audio_io.find_audio_files(path, recursive=recursive)
            if not found:
                run.inputs.append(_Input(name, path, error=f"no audio or video files in directory {name}"))
            candidates = [_tree_input(p, path) if recursive else _Input(str(p), p, p.stem) for p in found]
        else:
            candidates = [_Input(name, path, path.stem)]
        for item in candidates:
            key = os.path.realpath(item.source)
            if key not in seen:
                seen.add(key)
                run.inputs.append(item)
    _unique_stems(run.inputs)
    return run


def _tree_input(path: Path, root: Path) -> _Input:
    """A file found by --recursive: its outputs go to the same relative folder under the output directory, named
    after the file (with its extension too when another file of that folder has the same stem)."""
    relative = path.relative_to(root)
    twins = [p for p in path.parent.iterdir() if p != path and p.stem == path.stem and p.is_file()
             and p.suffix.lower() in audio_io.AUDIO_EXTENSIONS]
    stem = path.name if twins else path.stem
    subdir = str(relative.parent) if str(relative.parent) != "." else ""
    return _Input(str(path), path, stem, subdir=subdir)


def _unique_stems(inputs: list) -> None:
    """Two inputs with the same output name (a/x.wav and b/x.wav named directly, or x.wav and x.mp3) must not
    overwrite each other: later ones get -2, -3... (so names depend on the set of inputs; --recursive avoids it)."""
    taken: set = set()
    for item in inputs:
        if item.error is not None:
            continue
        stem, n = item.stem or "audio", 2
        while (item.subdir, stem) in taken:
            stem = f"{item.stem}-{n}"
            n += 1
        taken.add((item.subdir, stem))
        item.stem = stem


def _clock(seconds: float) -> str:
    minutes, secs = divmod(max(0.0, seconds), 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours:d}:{minutes:02d}:{secs:06.3f}" if hours else f"{minutes:02d}:{secs:06.3f}"


class _SpeechProgress:
    """Progress over the inputs and over the chunks of long inputs, on stderr.

    On a terminal: one status line rewritten in place (``\\r``), cleared whenever anything else is printed.
    Not on a terminal (only with ``--verbose``): one line per input and per chunk batch.
    """

    BAR = 20

    def __init__(self, total: int, enabled: bool, tty: bool):
        self.total = total
        self.enabled = enabled
        self.tty = tty and enabled
        self.done = 0
        self.current: Optional[_Input] = None
        self.status = ""  # what happens before the first input (loading the model)
        self.chunk: Optional[tuple] = None
        self._shown = 0  # width of the status line now on the terminal

    # -- events

    def loading(self, model: str) -> None:
        if self.tty:
            self.status = f"loading model {model}"
            self._draw()
        elif self.enabled:
            _say(f"loading model {model}")

    def start(self, item: _Input) -> None:
        self.current, self.chunk, self.status = item, None, ""
        if self.tty:
            self._draw()
        elif self.enabled:
            _say(f"[{item.number}/{self.total}] {item.label}")

    def focus(self, item: _Input) -> None:
        """``item`` is being worked on again (after the other inputs of its group were decoded)."""
        self.current, self.chunk = item, None
        if self.tty:
            self._draw()

    def chunks(self, item: _Input):
        """A ``progress(done_chunks, total_chunks)`` callback for the long input ``item``."""

        def update(done: int, total: int) -> None:
            self.current, self.chunk = item, (int(done), int(total))
            if self.tty:
                self._draw()
            elif self.enabled:
                _say(f"[{item.number}/{self.total}] {item.label}: chunk {done}/{total}")

        return update

    def finished(self) -> None:
        self.done += 1
        self.current, self.chunk = None, None
        if self.tty:
            self._draw()

    # -- output

    def clear(self) -> None:
        """Take the status line off the terminal before other output (it comes back with the next event)."""
        if self._shown:
            sys.stderr.write("\r" + " " * self._shown + "\r")
            sys.stderr.flush()
            self._shown = 0

    def close(self) -> None:
        self.clear()
        self.current, self.status = None, ""

    def _line(self, width: int) -> str:
        if self.status:
            return self.status if len(self.status) <= width else self.status[: width - 3] + "..."
        fraction = self.done
        if self.chunk and self.chunk[1]:
            fraction += self.chunk[0] / self.chunk[1]
        filled = int(self.BAR * fraction / max(1, self.total))
        line = f"[{'#' * filled}{'-' * (self.BAR - filled)}] {self.done}/{self.total} files"
        if self.current is None or self.done >= self.total:
            return line[:width]
        name = Path(self.current.label).name or self.current.label
        tail = f" (chunk {self.chunk[0]}/{self.chunk[1]})" if self.chunk else ""
        room = width - len(line) - len(" | ") - len(tail)
        if room < 8:  # too narrow for a name: keep the counts
            return (line + tail)[:width]
        if len(name) > room:
            name = "..." + name[-(room - 3):]
        return f"{line} | {name}{tail}"

    def _draw(self) -> None:
        import shutil

        line = self._line(max(20, shutil.get_terminal_size((80, 24)).columns - 1))
        sys.stderr.write("\r" + line + " " * max(0, self._shown - len(line)))
        sys.stderr.flush()
        self._shown = len(line)


def _error_message(error: BaseException, verbose: bool) -> str:
    """One input's failure as a line: a ``CanaryError``'s own message, else (a bug) the exception named, with the
    traceback under --verbose."""
    if isinstance(error, CanaryError):
        return str(error)
    if verbose:
        _say("".join(traceback.format_exception(type(error), error, error.__traceback__)).rstrip())
    return f"unexpected error ({type(error).__name__}: {error}); please report it, with --verbose output"


def _speech_options(args: argparse.Namespace) -> TranscribeOptions:
    """The transcription options the command line sets (the model's defaults for what it leaves out)."""
    named = {"batch_size": args.batch_size, "beam_size": args.beam_size, "length_penalty": args.len_pen,
             "chunk_seconds": args.chunk_length, "channel": args.channel}
    return TranscribeOptions(
        source_lang=args.source_lang,
        target_lang=args.target_lang,  # None: the source language (identified, with auto)
        pnc=args.pnc,
        timestamps=args.timestamps,
        streaming=_streaming_options(args),
        **{name: value for name, value in named.items() if value is not None},
    )


def _bare_lang(lang: Optional[str]) -> str:
    lang = (lang or "").strip()
    return lang[2:-2] if lang.startswith("<|") and lang.endswith("|>") else lang


def _cmd_speech(args: argparse.Namespace) -> int:
    if not args.model:
        raise CanaryError(f"no model given: pass --model DIR_OR_REPO (e.g. {DEFAULT_MODEL})")
    options = _speech_options(args)
    if args.manifest is not None:
        return _cmd_corpus(args, options)
    load_options = _quantize_options(args)
    if not args.audio:  # `mlx-canary demo` alone: the bundled sample
        args.audio = [str(DEMO_MODEL_DIR / "sample.wav")]
    run = _expand_inputs(args.audio, recursive=args.recursive)
    output_dir = Path(args.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CanaryError(f"cannot create output directory {output_dir}: {e.strerror or e}") from None

    if args.verbose:
        _say(_blas.blas_status())
    pending = [item for item in run.inputs if item.error is None]
    for item in pending:
        if item.source != "-" and not Path(item.source).exists():
            item.error = f"audio file not found: {item.label}"
    pending = [item for item in pending if item.error is None]
    for number, item in enumerate(pending, start=1):
        item.number = number

    tty = sys.stderr.isatty()
    progress = _SpeechProgress(len(pending), enabled=not args.quiet and (args.verbose or tty), tty=tty)
    try:
        if pending:
            progress.loading(args.model)
            model = _load_model(args, load_options)
            # Checked once, before any audio is decoded: an unsupported option (language, translation pair,
            # timestamps on a model without them) is one error, not the same failure repeated for every input.
            source = model.prepare(options).options.source_lang
            if args.task == "translate" and _bare_lang(source) == _bare_lang(args.target_lang):
                raise CanaryError(
                    f"translate: the source and target language are both {_bare_lang(args.target_lang)!r}; name "
                    "the spoken language with --source-lang (or auto), or use `mlx-canary transcribe`"
                )
            with warnings.catch_warnings():
                warnings.simplefilter("always", LanguageFallbackWarning)
                warnings.showwarning = lambda message, *_args, **_kw: (progress.clear(), _say(f"warning: {message}"))
                _transcribe_all(args, model, pending, options, output_dir, progress, several=len(run.inputs) > 1)
    finally:
        progress.close()

    failed = run.failed
    if failed:
        _say(f"error: {len(failed)} of {len(run.inputs)} inputs failed:")
        for item in failed:
            _say(f"  {item.label}: {item.error}")
        return 1
    return 0


def _cmd_ask(args: argparse.Namespace) -> int:
    if not args.model:
        raise CanaryError("name the speech-LLM with --model (e.g. a converted canary-qwen-2.5b directory)")
    model = _load_model(args, {})
    if not model.capabilities.chat:  # before any audio is decoded
        model.ask(args.question)
    path = Path(args.source).expanduser()
    if path.suffix.lower() == ".txt" and path.is_file():
        context = path.read_text(encoding="utf-8", errors="replace").strip()
    elif path.is_file():
        context = model.transcribe(str(path)).text
    else:
        context = args.source
    print(model.ask(args.question, context, max_new_tokens=args.max_new_tokens))
    return 0


TEXT_FILE_SUFFIXES = (".txt", ".srt", ".vtt")


def read_alignment_text(source: str) -> str:
    """The transcript ``align`` is given: stdin (``-``), a text file, the cue text of a .srt/.vtt file, or the
    argument itself."""
    path = Path(source).expanduser()
    if source == "-":
        text = sys.stdin.read()
    elif path.is_file():
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise CanaryError(f"cannot read the text file {source}: {e}") from None
        if path.suffix.lower() in (".srt", ".vtt"):
            text = subtitle_text(text)
    elif path.suffix.lower() in TEXT_FILE_SUFFIXES and "\n" not in source and len(source.split()) == 1:
        raise CanaryError(f"text file not found: {source}")
    else:
        text = source
    if not text.strip():
        raise CanaryError(f"the text to align ({'stdin' if source == '-' else source!r}) is empty")
    return text


def subtitle_text(document: str) -> str:
    """The spoken text of SRT/WebVTT cues: cue numbers, timing lines, the WEBVTT header, NOTE/STYLE blocks and
    markup tags left out."""
    import re

    lines = []
    for block in re.split(r"\n\s*\n", document.replace("\r\n", "\n")):
        rows = [row.strip() for row in block.strip().split("\n") if row.strip()]
        if not rows or rows[0].startswith(("WEBVTT", "NOTE", "STYLE", "REGION")):
            continue
        timing = next((i for i, row in enumerate(rows) if "-->" in row), None)
        if timing is None:
            continue
        lines += [re.sub(r"<[^>]*>|\{[^}]*\}", "", row) for row in rows[timing + 1 :]]
    return " ".join(lines)


def _cmd_align(args: argparse.Namespace) -> int:
    text = read_alignment_text(args.text)
    if not Path(args.audio).expanduser().is_file():
        raise CanaryError(f"audio file not found: {args.audio}")
    model = _load_model(args, {})
    if not model.capabilities.alignment:  # before the audio is decoded
        raise CanaryError(f"{args.model} has no aligner: forced alignment needs a model that carries one "
                          "(canary-1b-v2, converted by this version of mlx-canary)")
    with warnings.catch_warnings():
        warnings.simplefilter("always", AlignmentWarning)
        warnings.showwarning = lambda message, *_args, **_kw: _say(f"warning: {message}")
        result = model.align(args.audio, text, channel=args.channel)
    written = writers.write_outputs(result, Path(args.output_dir), Path(args.audio).stem, args.output_format,
                                    model=args.model)
    if not args.quiet:
        for seg in result.segments:
            print(f"[{_clock(float(seg['start']))} --> {_clock(float(seg['end']))}] {seg['text']}")
    if args.verbose:
        _say(f"  {result.duration:.2f} s of audio; wrote {', '.join(map(str, written))}")
    return 0


def _load_model(args: argparse.Namespace, load_options: dict):
    try:
        return load_model(args.model, dtype=args.dtype, **load_options)
    except (CanaryError, KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001
        # A model directory damaged in a way the loader does not name (a config.json of the wrong shape...)
        # still gets one line; --verbose shows where it failed.
        if args.verbose:
            _say(traceback.format_exc().rstrip())
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise CanaryError(
            f"cannot load model {args.model}: {type(e).__name__}: {first_line} (is the model directory damaged? "
            "convert it again)"
        ) from None


def _transcribe_all(args, model, pending: list, options: TranscribeOptions, output_dir: Path,
                    progress: _SpeechProgress, several: bool) -> None:
    """Decode and transcribe ``pending`` in groups of a few batches (``read_ahead``), writing each input's files.

    The short inputs of a group go to the scheduler together, longest first (``batch_order``: batches of similar
    lengths, each retried one by one if it fails), and are written in input order when they are done; then its long
    (chunked) ones one at a time, each written as it ends, so that chunk progress belongs to a named input. An
    interrupted run keeps everything written before it.
    """
    scheduler = Scheduler(lambda: model, max_batch_size=options.batch_size).load()

    def finish(jobs: list) -> None:
        for job in jobs:
            item = job.item
            error = job.future.exception()
            if error is None:
                result = job.future.result()
                if result.path is None and item.source != "-":
                    result.path = str(item.source)
                if result.model is None:
                    result.model = str(args.model)
                try:
                    written = writers.write_outputs(result, output_dir / item.subdir, item.stem, args.output_format)
                except CanaryError as e:
                    item.error = str(e)
                else:
                    progress.clear()
                    _report(args, item, result, written, several)
            else:
                item.error = _error_message(error, args.verbose)
            progress.finished()

    def run_group(short: list, long: list) -> None:
        if short:
            scheduler.run([short[i] for i in batch_order([len(job.wave) for job in short])])
            finish(short)
        for job in long:
            progress.focus(job.item)
            job.progress = progress.chunks(job.item)
            finish(scheduler.run([job]))

    def loaded():
        """(item, samples), or (item, None) for an input that failed to load (its error recorded)."""
        for item in pending:
            progress.start(item)
            wave = None
            try:
                wave = audio_io.load_audio(item.source, channel=options.channel)
            except CanaryError as e:
                item.error = str(e)
            else:
                if wave.size == 0:
                    item.error = f"no audio samples in {item.label} (the file holds no audio)"
            if item.error is not None:
                progress.finished()
                wave = None
            yield item, wave

    # Read a few batches ahead, bounded in audio as well, as the Python API does.
    decoded = options.replace(channel=None)  # the channel is chosen as each file is read, above
    for group in read_ahead(loaded(), lambda entry: 0 if entry[1] is None else entry[1].size, lookahead_inputs(options)):
        short, long = [], []
        for item, wave in group:
            if wave is not None:
                (long if model.needs_chunking(wave, options.chunk_seconds) else short).append(Job(wave, decoded, item))
        run_group(short, long)


def _report(args: argparse.Namespace, item: _Input, result, written: list, several: bool) -> None:
    if args.quiet:
        return
    if several:
        print(f"==> {item.label} <==")
    segments = getattr(result, "segments", None) or []
    if args.verbose and segments:
        for seg in segments:
            print(f"[{_clock(float(seg.get('start', 0)))} --> {_clock(float(seg.get('end', 0)))}] "
                  f"{str(seg.get('text', '')).strip()}")
    else:
        print(str(result.text).strip())
    sys.stdout.flush()
    if args.verbose:
        _say(f"  {float(getattr(result, 'duration', 0.0)):.2f} s of audio; wrote {', '.join(map(str, written))}")


def _cmd_corpus(args: argparse.Namespace, options: TranscribeOptions) -> int:
    """``--manifest``: the corpus job (mlx_canary/corpus.py); 1 when any item failed."""
    from . import corpus, evaluation

    if args.audio:
        raise CanaryError("give either audio files or --manifest, not both")
    if args.output_format != ["txt"]:
        raise CanaryError("--output-format does not apply to --manifest: its output is OUT/<name>_predictions.jsonl")
    normalize = evaluation.parse_normalizations(args.normalize)
    if args.verbose:
        _say(_blas.blas_status())
    tty = sys.stderr.isatty()
    progress = None if args.quiet else corpus.CorpusProgress(sys.stderr, tty=tty, lines=args.verbose)
    load_options = _quantize_options(args)
    executor = None
    if args.ray is not None:
        from .corpus_ray import RayExecutor

        executor = RayExecutor(args.ray, args.model, dtype=args.dtype, load_options=load_options,
                               batch_size=options.batch_size, decode_workers=args.decode_workers,
                               workers=args.ray_workers)
    elif args.ray_workers is not None:
        raise CanaryError("--ray-workers only applies with --ray")
    with warnings.catch_warnings():
        # Shown once (not once per item: a corpus has thousands), as one line under the progress line.
        warnings.simplefilter("default", LanguageFallbackWarning)
        warnings.showwarning = lambda message, *_args, **_kw: (progress and progress.close(),
                                                               _say(f"warning: {message}"))
        summary = corpus.transcribe_corpus(
            Path(args.manifest), Path(args.output_dir), options, lambda: _load_model(args, load_options),
            decode_workers=args.decode_workers, normalize=normalize, progress=progress,
            say=(lambda line: None) if args.quiet else _say, executor=executor)
    return 1 if summary.failed else 0


# -- listen ---------------------------------------------------------------------------------------------


def _cmd_listen(args: argparse.Namespace) -> int:
    if args.list_devices:
        return list_devices()
    options = TranscribeOptions(source_lang=args.source_lang, target_lang=args.target_lang, pnc=args.pnc,
                                streaming=_streaming_options(args))
    return listen(args, lambda: _load_model(args, _quantize_options(args)), options)


# -- serve -----------------------------------------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace) -> int:
    if not args.model:
        raise CanaryError("no model given: pass --model DIR_OR_REPO (or set MLX_CANARY_MODEL)")
    if args.verbose:
        _say(_blas.blas_status())
    return serve(
        args.model, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb,
        max_batch_size=args.max_batch_size, dtype=args.dtype, api_key=args.api_key or None,
        log_level="warning" if args.quiet else "debug" if args.verbose else "info",
        limits=ConnectionLimits(read_timeout=args.read_timeout, upload_timeout=args.upload_timeout,
                                max_connections=args.max_connections, max_streams=args.max_streams,
                                stream_idle_timeout=args.stream_idle_timeout),
    )


# -- entry point -----------------------------------------------------------------------------------------


def main(argv: Optional[list] = None) -> int:
    """Run the command line; returns the exit status (the console script passes it to ``sys.exit``)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        return 130
    if args.command in ("transcribe", "translate") and not args.audio and args.manifest is None:
        parser.error(f"{args.command}: the following arguments are required: AUDIO (or --manifest PATH)")
    try:
        return args.func(args)
    except CanaryError as e:
        _say(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except BrokenPipeError:
        # The reader of our stdout went away (e.g. `| head`): stop quietly, and keep Python's shutdown flush
        # from raising again on the dead pipe.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
