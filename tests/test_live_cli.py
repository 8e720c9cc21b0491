"""Streaming from the command line, for real on the bundled demo model: ``transcribe --streaming`` and ``listen``
(a file played in at real-time pace; Ctrl-C stops cleanly and writes everything heard)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import mlx_canary
from mlx_canary import cli
from mlx_canary.loading import DEMO_MODEL_DIR
from mlx_canary.streaming_policy import StreamingOptions

SAMPLE = DEMO_MODEL_DIR / "sample.wav"
REPO = Path(__file__).resolve().parent.parent
LIVE = StreamingOptions(policy="alignatt", chunk_secs=1.0, right_context_secs=0.5)


@pytest.fixture(scope="module")
def demo():
    return mlx_canary.load_model("demo")


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.mark.parametrize("policy", ["waitk", "alignatt"])
def test_transcribe_streaming_writes_the_streaming_result(demo, tmp_path, capsys, policy):
    code, out, err = run_cli(capsys, "transcribe", SAMPLE, "-m", "demo", "--streaming", policy, "--chunk-secs", "1",
                             "--right-context-secs", "0.5", "-f", "json,srt", "-o", tmp_path)
    assert code == 0, err
    data = json.loads((tmp_path / "sample.json").read_text())
    expected = demo.transcribe(str(SAMPLE), streaming=StreamingOptions(policy=policy, chunk_secs=1.0,
                                                                       right_context_secs=0.5))
    assert data["tokens"] == expected.tokens and data["text"] == expected.text == "Up big white house dog car."
    # the same as a live session fed small pieces
    session = demo.stream(streaming=StreamingOptions(policy=policy, chunk_secs=1.0, right_context_secs=0.5))
    samples, _ = sf.read(SAMPLE, dtype="float32")
    for start in range(0, len(samples), 777):
        session.feed(samples[start : start + 777])
    assert session.finish().tokens == data["tokens"]
    assert data["segments"] and data["segments"][-1]["end"] <= data["duration"] + 1e-6
    assert "-->" in (tmp_path / "sample.srt").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--streaming", "waitk", "--timestamps"], "does not combine with timestamps"),
    (["--streaming", "waitk", "-s", "auto"], "does not combine with source_lang='auto'"),
    (["--streaming", "waitk", "--beam-size", "4"], "does not combine with beam search"),
    (["--chunk-secs", "1"], "--chunk-secs only applies with --streaming"),
])
def test_streaming_refuses_what_it_cannot_do(tmp_path, capsys, argv, message):
    code, _, err = run_cli(capsys, "transcribe", SAMPLE, "-m", "demo", *argv, "-o", tmp_path)
    assert code == 1 and message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_listen_to_a_file_prints_the_captions_and_writes_the_transcript(demo, tmp_path, capsys):
    code, out, err = run_cli(capsys, "listen", "--file", SAMPLE, "--speed", "0", "-m", "demo", "-o", tmp_path,
                             "-f", "txt,vtt,json")
    assert code == 0, err
    expected = demo.transcribe(str(SAMPLE), streaming=LIVE)
    assert out.strip() == expected.text
    assert (tmp_path / "sample.txt").read_text().strip() == expected.text
    assert json.loads((tmp_path / "sample.json").read_text())["tokens"] == expected.tokens
    assert (tmp_path / "sample.vtt").read_text().startswith("WEBVTT")


def test_listen_translates(tmp_path, capsys):
    code, out, err = run_cli(capsys, "listen", "--file", SAMPLE, "--speed", "0", "-m", "demo", "-t", "de",
                             "-o", tmp_path, "-q")
    assert code == 0, err
    assert json.loads(json.dumps(out)) == "" and (tmp_path / "sample.txt").read_text().strip()


def test_ctrl_c_stops_listening_and_loses_nothing(tmp_path):
    """A long file at real-time pace; Ctrl-C after the first captions: the process finishes the audio it heard,
    prints it, writes the transcript, and exits 0."""
    samples, rate = sf.read(SAMPLE, dtype="float32")
    pause = np.zeros(rate // 2, np.float32)
    long = tmp_path / "long.wav"
    sf.write(long, np.concatenate([samples, pause] * 8), rate, subtype="PCM_16")  # ~32 s
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "mlx_canary", "listen", "--file", str(long), "-m", "demo",
                             "-o", str(tmp_path / "out"), "-f", "txt,json"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    try:
        first = os.read(proc.stdout.fileno(), 2).decode()  # the first captions (unbuffered: nothing held back)
        assert first, proc.stderr.read()
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        rest, err = (data.decode() for data in proc.communicate(timeout=60))
    finally:
        if proc.poll() is None:
            proc.kill()
    printed = (first + rest).strip()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    written = (tmp_path / "out" / "long.txt").read_text().strip()
    assert written == printed and written.startswith("Up big white house dog car.")
    duration = json.loads((tmp_path / "out" / "long.json").read_text())["duration"]
    assert 1.0 < duration < 30.0  # stopped early: only what was heard


def test_list_devices_without_a_sound_card(capsys):
    code, out, err = run_cli(capsys, "listen", "--list-devices")
    assert code == 0 or (code == 1 and "sounddevice" in err)
