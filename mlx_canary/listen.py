"""``mlx-canary listen``: live captions from the microphone, or from a file played in at real-time pace.

The final text is printed as the streaming session decides it (``CanaryModel.stream``: NeMo's Wait-k / AlignAtt
streaming). Ctrl-C stops capturing; the session then decodes what it already heard, prints the rest and the
transcript is written (txt / srt / vtt / json: caption lines with the times they became final), so nothing heard
is lost. The microphone is read through PortAudio (the ``sounddevice`` package) at 16 kHz mono.
"""

from __future__ import annotations

import argparse
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from . import audio as audio_io
from . import writers
from .audio import SAMPLE_RATE
from .errors import CanaryError
from .options import TranscribeOptions

PIECE_SECONDS = 0.1  # audio handed to the session at a time (the session decides once a whole chunk is in)
_INSTALL_SOUNDDEVICE = ("the microphone needs the sounddevice package and PortAudio: pip install sounddevice "
                        "(Linux: apt-get install libportaudio2); or caption a file with --file")


def add_listen_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--file", default=None, metavar="AUDIO",
                        help="caption this file, played in at real-time pace (for demos and tests)")
    source.add_argument("--input-device", default=None, metavar="DEVICE",
                        help="microphone: a device number or (part of a) name from --list-devices "
                        "(default: the system's default input)")
    source.add_argument("--list-devices", action="store_true", help="list the audio input devices and exit")
    parser.add_argument("--speed", type=float, default=1.0, metavar="X",
                        help="with --file: play it in X times faster than real time (0: as fast as possible)")


def _sounddevice():
    try:
        import sounddevice
    except ImportError:
        raise CanaryError(_INSTALL_SOUNDDEVICE) from None
    except OSError as e:  # the package is there, PortAudio is not
        raise CanaryError(f"{_INSTALL_SOUNDDEVICE} ({e})") from None
    return sounddevice


def list_devices() -> int:
    sd = _sounddevice()
    inputs = [(i, d) for i, d in enumerate(sd.query_devices()) if d["max_input_channels"] > 0]
    if not inputs:
        print("no audio input devices found")
        return 0
    default = sd.default.device[0]
    for index, device in inputs:
        mark = "*" if index == default else " "
        print(f"{mark} {index:3d}  {device['name']}  ({device['max_input_channels']} ch, "
              f"{device['default_samplerate']:g} Hz)")
    return 0


class FileSource:
    """A file's samples in pieces of ``PIECE_SECONDS``, paced like a live recording (``speed`` x real time)."""

    def __init__(self, path: str, speed: float, channel: Optional[int] = None):
        if not speed >= 0:
            raise CanaryError(f"--speed must be 0 or more, got {speed}")
        self.samples = audio_io.load_audio(path, channel=channel)
        self.speed = speed

    def pieces(self, stopped: threading.Event) -> Iterator[np.ndarray]:
        step = int(PIECE_SECONDS * SAMPLE_RATE)
        started = time.monotonic()
        for start in range(0, len(self.samples), step):
            if stopped.is_set():
                return
            end = min(start + step, len(self.samples))
            if self.speed > 0:  # the piece is "heard" only once its last sample has been played
                delay = started + end / SAMPLE_RATE / self.speed - time.monotonic()
                if delay > 0 and stopped.wait(delay):
                    return
            yield self.samples[start:end]


class MicrophoneSource:
    """The microphone at 16 kHz mono, through PortAudio; blocks arrive on PortAudio's thread."""

    def __init__(self, device: Optional[str]):
        self.sd = _sounddevice()
        self.device = int(device) if device is not None and device.isdigit() else device
        self.blocks: "queue.Queue[np.ndarray]" = queue.Queue()

    def _callback(self, data, frames, time_info, status) -> None:
        self.blocks.put(data[:, 0].copy())

    def pieces(self, stopped: threading.Event) -> Iterator[np.ndarray]:
        try:
            stream = self.sd.InputStream(samplerate=SAMPLE_RATE, channels=1, dtype="float32", device=self.device,
                                         blocksize=int(PIECE_SECONDS * SAMPLE_RATE), callback=self._callback)
        except (self.sd.PortAudioError, ValueError) as e:
            raise CanaryError(f"cannot open the microphone ({e}); see --list-devices") from None
        with stream:
            while not stopped.is_set():
                try:
                    yield self.blocks.get(timeout=0.1)
                except queue.Empty:
                    continue
        while not self.blocks.empty():  # what was recorded before the stop is still heard
            yield self.blocks.get_nowait()


def _stop_on_ctrl_c(stopped: threading.Event):
    """Ctrl-C sets ``stopped`` (a second one interrupts at once); returns the handler it replaced."""

    def handler(signum, frame):
        if stopped.is_set():
            raise KeyboardInterrupt
        stopped.set()

    return signal.signal(signal.SIGINT, handler)


def listen(args: argparse.Namespace, load: Callable, options: TranscribeOptions) -> int:
    """Caption ``args.file`` or the microphone until it ends or Ctrl-C, then write the transcript."""
    source = FileSource(args.file, args.speed) if args.file else MicrophoneSource(args.input_device)
    model = load()
    session = model.stream(options)  # checks the options against the model before anything is heard
    out_dir = Path(args.output_dir)
    stem = Path(args.file).stem if args.file else time.strftime("listen-%Y%m%d-%H%M%S")
    quiet = getattr(args, "quiet", False)
    if not quiet and not args.file:
        print("listening (Ctrl-C to stop)", file=sys.stderr, flush=True)
    stopped = threading.Event()
    previous = _stop_on_ctrl_c(stopped)
    events = []
    try:
        for piece in source.pieces(stopped):
            for event in session.feed(piece):
                events.append(event)
                _show(event.text, quiet)
    finally:
        signal.signal(signal.SIGINT, previous)
    result = session.finish()
    for event in result.events:
        events.append(event)
        _show(event.text, quiet)
    if not quiet:
        print(flush=True)
    task = options.task(session_language(model, options))
    transcript = result.to_transcript(events, source_lang=task.source_lang, target_lang=task.target_lang,
                                      model=str(args.model), path=args.file)
    written = writers.write_outputs(transcript, out_dir, stem, args.output_format)
    if getattr(args, "verbose", False):
        print(f"  {transcript.duration:.2f} s heard; wrote {', '.join(map(str, written))}", file=sys.stderr)
    return 0


def session_language(model, options: TranscribeOptions) -> str:
    return options.source_lang or model.capabilities.default_source_lang


def _show(text: str, quiet: bool) -> None:
    if not quiet and text:
        sys.stdout.write(text)
        sys.stdout.flush()
