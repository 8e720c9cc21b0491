"""Corpus jobs (mlx_canary/corpus.py): manifests in and out, per-row options, the journal (torn lines, resume),
a job killed with SIGKILL and resumed, folder trees. Runs the bundled demo model (no download)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mlx_canary import audio as audio_io
from mlx_canary import cli, corpus
from mlx_canary.errors import CanaryError
from mlx_canary.loading import DEMO_MODEL_DIR, load_model
from mlx_canary.options import TranscribeOptions

REPO = Path(__file__).resolve().parents[1]
SAMPLE = DEMO_MODEL_DIR / "sample.wav"


@pytest.fixture(scope="module")
def demo():
    return load_model("demo")


def make_corpus(folder: Path, count: int, extra_rows=()) -> Path:
    """``count`` pieces of the demo sample (1.2-3.5 s, in no duration order) and a manifest of them with
    reference text; relative paths."""
    samples, rate = sf.read(SAMPLE, dtype="float32")
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        length = int(len(samples) * (0.35 + 0.65 * ((i * 7) % count) / max(1, count - 1)))
        path = folder / "audio" / f"clip{i:03d}.wav"
        sf.write(path, samples[:length], rate)
        rows.append({"audio_filepath": f"audio/{path.name}", "duration": length / rate, "text": "big white house"})
    rows.extend(extra_rows)
    manifest = folder / "in.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def read_rows(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_cli(*argv) -> int:
    return cli.main([str(a) for a in argv])


# -- reading --------------------------------------------------------------------------------------------------


def test_manifest_rows_paths_and_per_row_options(tmp_path):
    (tmp_path / "sub").mkdir()
    manifest = tmp_path / "sub" / "m.json"
    rows = [
        {"audio_filepath": "a.wav", "duration": 1.0},
        {"audio_filepath": str(SAMPLE), "source_lang": "de", "pnc": "no"},
        {"audio_filepath": "b.wav", "source_lang": "de", "target_lang": "en", "timestamp": "yes"},
        {"audio_filepath": "c.wav", "offset": 1.5, "duration": 2.0, "pnc": False},
    ]
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "sub" / "a.wav").write_bytes(b"")
    items = corpus.read_manifest(manifest, TranscribeOptions(pnc=True))
    assert [item.audio for item in items] == [tmp_path / "sub" / "a.wav", SAMPLE, Path("b.wav"), Path("c.wav")]
    assert items[0].options == TranscribeOptions(pnc=True)
    assert items[1].options == TranscribeOptions(source_lang="de", pnc=False)
    assert items[2].options == TranscribeOptions(source_lang="de", target_lang="en", timestamps=True)
    assert (items[3].offset, items[3].duration, items[3].options.pnc) == (1.5, 2.0, False)
    assert len({item.key for item in items}) == 4


def test_duplicate_rows_are_distinct_items_and_keys_ignore_batch_size(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(2 * (json.dumps({"audio_filepath": str(SAMPLE)}) + "\n"))
    one = corpus.read_manifest(manifest, TranscribeOptions(batch_size=1))
    eight = corpus.read_manifest(manifest, TranscribeOptions(batch_size=8))
    assert one[0].key != one[1].key
    assert [i.key for i in one] == [i.key for i in eight]
    assert one[0].key != corpus.read_manifest(manifest, TranscribeOptions(pnc=False))[0].key


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2 is not JSON"),
    ("[1, 2]", "line 2 is not a JSON object"),
    ('{"duration": 1}', "line 2 has no audio_filepath"),
    ('{"audio_filepath": "a.wav", "pnc": "maybe"}', "line 2: pnc must be yes/no"),
    ('{"audio_filepath": "a.wav", "offset": -1}', "line 2: offset must be a finite number"),
    ('{"audio_filepath": "a.wav", "target_lang": "auto"}', "line 2: target language cannot be 'auto'"),
])
def test_malformed_manifest_is_one_error_naming_the_line(tmp_path, line, message):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio_filepath": "a.wav"}) + "\n" + line + "\n")
    with pytest.raises(CanaryError, match=message):
        corpus.read_manifest(manifest, TranscribeOptions())


def test_offset_reads_the_segment_as_lhotse_cuts_it(tmp_path):
    samples, rate = sf.read(SAMPLE, dtype="float32")
    whole = audio_io.load_audio(SAMPLE)
    assert rate == 16000
    segment = audio_io.load_segment(SAMPLE, 0.5, 1.25)
    np.testing.assert_array_equal(segment, whole[8000:8000 + 20000])
    # another rate: the segment is cut at the file's rate, then resampled alone
    path = tmp_path / "s8k.wav"
    sf.write(path, samples[::2], 8000)
    segment = audio_io.load_segment(path, 0.5, 1.0)
    np.testing.assert_array_equal(segment, audio_io.resample(samples[::2][4000:12000], 8000))
    with pytest.raises(CanaryError, match="outside the file"):
        audio_io.load_segment(SAMPLE, 3.0, 5.0)


# -- the journal ----------------------------------------------------------------------------------------------


def test_journal_drops_a_torn_last_line_and_never_merges_it(tmp_path):
    path = tmp_path / "j"
    journal = corpus.Journal(path)
    assert journal.open() == {}
    journal.append([{"key": "a", "index": 0, "row": {"pred_text": "x"}}, {"key": "b", "index": 1, "row": {}}])
    journal.close()
    with open(path, "ab") as f:
        f.write(b'{"key": "c", "index": 2, "ro')  # killed in the middle of a write
    journal = corpus.Journal(path)
    assert set(journal.open()) == {"a", "b"}
    journal.append([{"key": "d", "index": 3, "row": {}}])
    journal.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["a", "b", "d"]


def test_a_second_job_on_the_same_journal_is_refused(tmp_path):
    first = corpus.Journal(tmp_path / "j")
    first.open()
    try:
        with pytest.raises(CanaryError, match="another job is writing"):
            corpus.Journal(tmp_path / "j").open()
    finally:
        first.close()


# -- whole jobs -----------------------------------------------------------------------------------------------


def test_job_writes_every_row_in_input_order_with_errors(tmp_path, demo, capsys):
    extra = [{"audio_filepath": "audio/missing.wav", "duration": 1.0, "text": "x"},
             {"audio_filepath": "audio/bad.wav", "duration": 1.0},
             {"audio_filepath": str(SAMPLE), "offset": 0.5, "duration": 2.0, "pnc": "no"}]
    manifest = make_corpus(tmp_path, 7, extra)
    (tmp_path / "audio" / "bad.wav").write_bytes(b"RIFF\x00\x00")
    code = run_cli("transcribe", "--manifest", manifest, "-o", tmp_path / "out", "-m", "demo", "-b", "3")
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "10 items: 8 transcribed, 2 failed" in err
    rows = read_rows(tmp_path / "out" / "in_predictions.jsonl")
    inputs = read_rows(manifest)
    assert [{k: v for k, v in r.items() if k in inputs[i]} for i, r in enumerate(rows)] == inputs
    assert "audio file not found" in rows[7]["error"] and rows[7]["pred_text"] == ""
    assert "could not decode" in rows[8]["error"]
    # each row's prediction is the model's own for that input and options
    for row in rows[:7]:
        expected = demo.transcribe(str(tmp_path / row["audio_filepath"]))
        assert (row["pred_text"], row["tokens"]) == (expected.text, expected.tokens)
    segment = audio_io.load_segment(SAMPLE, 0.5, 2.0)
    assert rows[9]["pred_text"] == demo.transcribe(segment, pnc=False).text
    metrics = json.loads((tmp_path / "out" / "in_metrics.json").read_text())
    assert metrics["wer"]["items"] == 8 and metrics["wer"]["words"] == 22


def test_rerun_skips_finished_items_and_retries_failed_ones(tmp_path, capsys):
    manifest = make_corpus(tmp_path, 4, [{"audio_filepath": "audio/late.wav"}])
    out = tmp_path / "out"
    assert run_cli("transcribe", "--manifest", manifest, "-o", out, "-m", "demo", "-q") == 1
    first = read_rows(out / "in_predictions.jsonl")
    assert "error" in first[4]
    sf.write(tmp_path / "audio" / "late.wav", sf.read(SAMPLE, dtype="float32")[0], 16000)  # the file turns up
    capsys.readouterr()
    assert run_cli("transcribe", "--manifest", manifest, "-o", out, "-m", "demo") == 0
    err = capsys.readouterr().err
    assert "(4 done by an earlier run)" in err and "this run: 1 items" in err
    second = read_rows(out / "in_predictions.jsonl")
    assert second[:4] == first[:4] and second[4]["pred_text"] and "error" not in second[4]


def test_folder_tree(tmp_path, capsys):
    make_corpus(tmp_path / "tree", 3)
    (tmp_path / "tree" / "audio" / "deeper").mkdir()
    sf.write(tmp_path / "tree" / "audio" / "deeper" / "z.flac", sf.read(SAMPLE, dtype="float32")[0], 16000)
    assert run_cli("transcribe", "--manifest", tmp_path / "tree", "-o", tmp_path / "out", "-m", "demo", "-q") == 0
    rows = read_rows(tmp_path / "out" / "tree_predictions.jsonl")
    assert [Path(r["audio_filepath"]).name for r in rows] == ["clip000.wav", "clip001.wav", "clip002.wav", "z.flac"]
    assert all(r["pred_text"] and r["duration"] > 1 for r in rows)


def test_timestamps_in_nemo_names(tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio_filepath": str(SAMPLE), "timestamp": "yes"}) + "\n")
    code = run_cli("transcribe", "--manifest", manifest, "-o", tmp_path, "-m", "demo", "-q")
    capsys.readouterr()
    if code != 0:
        pytest.skip("the demo model has no timestamps")
    row = read_rows(tmp_path / "m_predictions.jsonl")[0]
    assert row["word"] and {"word", "start", "end"} <= set(row["word"][0])
    assert row["segment"] and {"segment", "start", "end"} <= set(row["segment"][0])


def test_manifest_and_audio_together_is_refused(tmp_path, capsys):
    assert run_cli("transcribe", SAMPLE, "--manifest", tmp_path / "m.jsonl", "-m", "demo") == 1
    assert "not both" in capsys.readouterr().err
    assert run_cli("transcribe", "--manifest", tmp_path / "m.jsonl", "-m", "demo", "-f", "srt") == 1
    assert "--output-format does not apply" in capsys.readouterr().err
    assert run_cli("transcribe", "--manifest", tmp_path / "m.jsonl", "-m", "demo", "--ray-workers", "2") == 1
    assert "--ray-workers only applies with --ray" in capsys.readouterr().err
    assert run_cli("transcribe", "--manifest", tmp_path / "nope.jsonl", "-m", "demo") == 1
    assert "manifest not found" in capsys.readouterr().err


def test_killed_job_resumes_with_nothing_lost_and_nothing_twice(tmp_path):
    """SIGKILL a running job (a subprocess) once it has written part of its results, damage the journal's end as
    a kill in mid-write would, run the same command again: every input once, in order, as an unbroken run."""
    manifest = make_corpus(tmp_path, 36, [{"audio_filepath": "audio/missing.wav", "duration": 9.0}])
    out = tmp_path / "out"
    journal = out / "in_predictions.jsonl.journal"
    command = [sys.executable, "-m", "mlx_canary", "transcribe", "--manifest", str(manifest), "-o", str(out),
               "-m", "demo", "-b", "3", "-q"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and job.poll() is None:
        if journal.exists() and journal.read_bytes().count(b"\n") >= 5:
            break
        time.sleep(0.02)
    assert job.poll() is None, f"the job ended before it could be killed: {job.stderr.read().decode()[-2000:]}"
    job.send_signal(signal.SIGKILL)
    job.wait(30)
    done_before = journal.read_bytes().count(b"\n")
    assert 5 <= done_before < 37
    assert not (out / "in_predictions.jsonl").exists()
    with open(journal, "ab") as f:
        f.write(b'{"key": "torn", "ind')
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 1, resumed.stderr  # the missing file
    rows = read_rows(out / "in_predictions.jsonl")
    assert [r["audio_filepath"] for r in rows] == [r["audio_filepath"] for r in read_rows(manifest)]
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    transcribed = [r["key"] for r in records if "error" not in r["row"]]
    assert len(transcribed) == len(set(transcribed)) == 36  # nothing transcribed twice (failures are retried)
    # the same as a run never interrupted
    fresh = [str(tmp_path / "fresh") if part == str(out) else part for part in command]
    subprocess.run(fresh, env=env, capture_output=True, timeout=300)
    fresh = tmp_path / "fresh"
    assert read_rows(fresh / "in_predictions.jsonl") == rows


def test_progress_line():
    summary = corpus.CorpusSummary(items=10, skipped=2, done=3, audio_seconds=120.0, wall_seconds=10.0)
    line = corpus.CorpusProgress(tty=False).render(summary, 3600.0, 120.0)
    assert "5/10 items" in line and "0:02:00/1:00:00 of audio" in line and "12.0x real time" in line
    assert "ETA 0:04:50" in line


def test_batches_hold_equal_options_longest_first(tmp_path):
    german = TranscribeOptions(source_lang="de")
    items = corpus.assign_keys([
        corpus.CorpusItem(i, {"audio_filepath": f"{i}.wav"}, Path(f"{i}.wav"),
                          german if i % 3 == 0 else TranscribeOptions(), duration=float(d))
        for i, d in enumerate([1, 5, 3, 9, 2, 2, 7, 4])])
    durations = {item.key: item.duration for item in items}
    batches = corpus.plan_batches(items, durations, batch_size=2)
    assert [[item.index for item in batch] for batch in batches] == [[3, 6], [0], [1, 7], [2, 4], [5]]
    assert all(len({item.options for item in batch}) == 1 for batch in batches)


def test_progress_on_a_terminal_rewrites_one_line():
    import io

    stream = io.StringIO()
    progress = corpus.CorpusProgress(stream, tty=True)
    summary = corpus.CorpusSummary(items=4, done=1, audio_seconds=10.0, wall_seconds=1.0)
    progress(summary, 40.0, 10.0)
    summary.done, summary.audio_seconds = 4, 40.0
    progress(summary, 40.0, 40.0)
    progress.close()
    written = stream.getvalue()
    assert "\n" not in written and written.count("\r") == 4 and "4/4 items" in written


# -- the Ray executor's bookkeeping, with a stand-in for Ray (the real cluster: tests/test_corpus_ray.py) ---------


class _FakeRay:
    """What RayExecutor uses of Ray. Worker ``w`` dies (as when its restarts are used up) when it is given its
    ``die_at[w]``-th batch: that batch and every later call to it raise RayActorError."""

    class exceptions:
        class RayError(Exception):
            pass

        class RayActorError(RayError):
            pass

        class RayTaskError(RayError):
            pass

        class GetTimeoutError(RayError):
            pass

    def __init__(self, workers: int, die_at: dict):
        self.workers, self.die_at, self.made, self.runs = workers, die_at, 0, []

    def nodes(self):
        return [{"Alive": True}] * self.workers

    def remote(self, **_options):
        return lambda cls: types.SimpleNamespace(remote=self._actor)

    def _actor(self, *args):
        number, calls = self.made, []
        self.made += 1
        fake = self

        def run(batch):
            calls.append(batch)
            if len(calls) >= fake.die_at.get(number, 10 ** 9):
                return _FakeRef(error=fake.exceptions.RayActorError(f"worker {number} died"))
            fake.runs.append((number, [item.index for item in batch]))
            return _FakeRef(value=[{"pred_text": f"row {item.index}"} for item in batch])

        ready = lambda: _FakeRef(value={"host": "h", "pid": number, "default_lang": "en"})  # noqa: E731
        return types.SimpleNamespace(run=types.SimpleNamespace(remote=run), ready=types.SimpleNamespace(remote=ready))

    def get(self, refs, timeout=None):
        return [ref.get() for ref in refs] if isinstance(refs, list) else refs.get()

    def wait(self, refs, num_returns=1):
        return refs[:1], refs[1:]

    def cancel(self, ref, force=False):
        pass

    def kill(self, actor, no_restart=True):
        pass


class _FakeRef:
    def __init__(self, value=None, error=None):
        self.value, self.error = value, error

    def get(self):
        if self.error is not None:
            raise self.error
        return self.value


def _ray_job(tmp_path, monkeypatch, fake, count=12):
    from mlx_canary import corpus_ray

    monkeypatch.setattr(corpus_ray, "connect", lambda address: fake)
    items = corpus.assign_keys([corpus.CorpusItem(i, {"audio_filepath": f"{i}.wav"}, Path(f"{i}.wav"),
                                                  TranscribeOptions(batch_size=2), duration=float(i))
                                for i in range(count)])
    executor = corpus_ray.RayExecutor("fake", "demo", batch_size=2, workers=2)
    return corpus.run_corpus(items, tmp_path / "p.jsonl", tmp_path / "p.jsonl.journal", executor, batch_size=2)


def test_ray_batches_of_a_dead_worker_go_to_the_others(tmp_path, monkeypatch):
    fake = _FakeRay(workers=2, die_at={0: 2})
    summary = _ray_job(tmp_path, monkeypatch, fake)
    assert [row["pred_text"] for row in summary.rows] == [f"row {i}" for i in range(12)]
    done = sorted(i for _, batch in fake.runs for i in batch)
    assert done == list(range(12))  # each batch ran (and was written) once
    assert {worker for worker, _ in fake.runs[1:]} == {1}  # after its death nothing more went to worker 0
    records = (tmp_path / "p.jsonl.journal").read_text().splitlines()
    assert len(records) == 12


def test_ray_job_whose_workers_all_die_stops_and_resumes(tmp_path, monkeypatch):
    with pytest.raises(CanaryError, match="every Ray worker died; run the same command again"):
        _ray_job(tmp_path, monkeypatch, _FakeRay(workers=2, die_at={0: 3, 1: 2}))
    kept = len((tmp_path / "p.jsonl.journal").read_text().splitlines())
    assert 0 < kept < 12 and not (tmp_path / "p.jsonl").exists()
    healthy = _FakeRay(workers=2, die_at={})
    summary = _ray_job(tmp_path, monkeypatch, healthy)
    assert summary.skipped == kept and sum(len(batch) for _, batch in healthy.runs) == 12 - kept
    assert [row["pred_text"] for row in summary.rows] == [f"row {i}" for i in range(12)]


def test_auto_language_rows_report_pred_lang_and_warn_once(tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(3 * (json.dumps({"audio_filepath": str(SAMPLE), "source_lang": "auto"}) + "\n"))
    assert run_cli("transcribe", "--manifest", manifest, "-o", tmp_path, "-m", "demo") == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("warning:") <= 1
    rows = read_rows(tmp_path / "m_predictions.jsonl")
    assert all(row["pred_lang"] in ("en", "de", "es", "fr") for row in rows)


def test_streaming_options_reach_each_item(tmp_path, demo, capsys, monkeypatch):
    """A corpus decoded as live streams would be (to score streaming against offline): the model is called with
    the streaming options, and each row equals the streaming transcript of its file."""
    from mlx_canary.transcribe import CanaryModel

    seen = []
    original = CanaryModel.transcribe

    def spy(self, audio, options=None, **kwargs):
        seen.append(options.streaming)
        return original(self, audio, options, **kwargs)

    monkeypatch.setattr(CanaryModel, "transcribe", spy)
    manifest = make_corpus(tmp_path, 3)
    assert run_cli("transcribe", "--manifest", manifest, "-o", tmp_path / "out", "-m", "demo", "--streaming",
                   "waitk", "--chunk-secs", "0.5", "-q") == 0
    capsys.readouterr()
    rows = read_rows(tmp_path / "out" / "in_predictions.jsonl")
    for row in rows:
        options = cli._speech_options(cli.build_parser().parse_args(
            ["transcribe", "x", "--streaming", "waitk", "--chunk-secs", "0.5"]))
        expected = original(demo, str(tmp_path / row["audio_filepath"]), options)
        assert row["pred_text"] == expected.text
    assert seen and all(s is not None and s.policy == "waitk" and s.chunk_secs == 0.5 for s in seen)


LHOTSE_SEGMENTS = r"""
import json, sys
from lhotse import Recording
out = {}
for key, (path, offset, duration) in json.loads(sys.argv[1]).items():
    cut = Recording.from_file(path).to_cut().truncate(offset=offset, duration=duration)
    if cut.sampling_rate != 16000:
        cut = cut.resample(16000)
    out[key] = cut.load_audio()[0].tolist()
json.dump(out, open(sys.argv[2], "w"))
"""


@pytest.mark.parity
@pytest.mark.skipif(importlib.util.find_spec("lhotse") is None, reason="lhotse (NeMo's loader) is not installed")
def test_segments_equal_what_nemo_loads_for_offset_rows(tmp_path):
    """A manifest row with offset/duration: NeMo's lhotse reader cuts the recording (``truncate``) and resamples
    the cut; ours gives the same samples, bit for bit, at 16 kHz and at other rates (lhotse in a subprocess)."""
    from scipy.signal import resample_poly

    samples, _ = sf.read(SAMPLE, dtype="float32")
    sf.write(tmp_path / "s44.wav", resample_poly(samples, 441, 160).astype(np.float32), 44100, subtype="PCM_16")
    sf.write(tmp_path / "s8.flac", samples[::2], 8000)
    cases = {str(i): case for i, case in enumerate([
        (str(SAMPLE), 0.5, 1.25), (str(SAMPLE), 0.123, 0.777), (str(tmp_path / "s44.wav"), 0.3, 2.0),
        (str(tmp_path / "s44.wav"), 1.23456, 0.9), (str(tmp_path / "s8.flac"), 0.25, 1.1)])}
    done = subprocess.run([sys.executable, "-c", LHOTSE_SEGMENTS, json.dumps(cases), str(tmp_path / "ref.json")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = json.loads((tmp_path / "ref.json").read_text())
    for key, (path, offset, duration) in cases.items():
        np.testing.assert_array_equal(audio_io.load_segment(path, offset, duration),
                                      np.array(reference[key], dtype=np.float32), err_msg=str(cases[key]))
