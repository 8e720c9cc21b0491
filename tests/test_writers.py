"""Tests for mlx_canary.writers (every output format, atomic writes) and the Transcript type."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from mlx_canary import writers
from mlx_canary.errors import CanaryError
from mlx_canary.transcript import Transcript


@pytest.fixture
def timed() -> Transcript:
    return Transcript(
        text="Hello world. How are you?",
        tokens=[11, 12, 13],
        source_lang="en",
        target_lang="en",
        duration=1.6,
        segments=[
            {"start": 0.0, "end": 0.72, "text": "Hello world."},
            {"start": 0.8, "end": 3725.5, "text": "How are you?"},
        ],
        words=[
            {"start": 0.0, "end": 0.24, "text": "Hello"},
            {"start": 0.32, "end": 0.72, "text": "world."},
        ],
        path="/data/hello.wav",
        model="canary-test",
        timestamps=True,
    )


@pytest.fixture
def plain() -> Transcript:
    return Transcript(text=" Guten Morgen!", tokens=[5, 6], source_lang="de", target_lang="en", duration=2.5)


def test_txt(timed, plain):
    assert writers.format_txt(timed) == "Hello world. How are you?\n"
    assert writers.format_txt(plain) == "Guten Morgen!\n"  # NeMo's leading space is not written
    assert writers.format_txt(Transcript(text="")) == ""


def test_srt_from_segments(timed):
    assert writers.format_srt(timed) == (
        "1\n00:00:00,000 --> 00:00:00,720\nHello world.\n"
        "\n"
        "2\n00:00:00,800 --> 01:02:05,500\nHow are you?\n"
    )


def test_vtt_from_segments(timed):
    assert writers.format_vtt(timed) == (
        "WEBVTT\n\n"
        "00:00:00.000 --> 00:00:00.720\nHello world.\n"
        "\n"
        "00:00:00.800 --> 01:02:05.500\nHow are you?\n"
    )


def test_tsv_from_segments(timed):
    assert writers.format_tsv(timed) == "start\tend\ttext\n0\t720\tHello world.\n800\t3725500\tHow are you?\n"


def test_without_timestamps_a_short_text_is_one_cue_over_the_audio(plain):
    assert writers.format_srt(plain) == "1\n00:00:00,000 --> 00:00:02,500\nGuten Morgen!\n"
    assert writers.format_vtt(plain) == "WEBVTT\n\n00:00:00.000 --> 00:00:02.500\nGuten Morgen!\n"
    assert writers.format_tsv(plain) == "start\tend\ttext\n0\t2500\tGuten Morgen!\n"


LONG = (
    "Good morning everyone, and welcome to the quarterly review of our engineering roadmap. "
    "Today we will cover three topics: the migration of the billing service, the new on-call rotation, "
    "and the hiring plan for next year. Questions? Please hold them until the end. Thanks."
)


def _check_estimated(cue_list, text, duration):
    """Cues tile [0, duration], times follow character counts, texts rebuild the text and fit 2x42."""
    assert " ".join(c[2] for c in cue_list) == " ".join(text.split())
    assert cue_list[0][0] == 0.0 and cue_list[-1][1] == pytest.approx(duration)
    total = sum(len(c[2]) for c in cue_list)
    for (start, end, cue_text), following in zip(cue_list, cue_list[1:] + [None]):
        assert end - start == pytest.approx(duration * len(cue_text) / total)
        if following is not None:
            assert following[0] == end
        lines = writers.wrap_lines(cue_text)
        assert len(lines) <= 2 and all(len(line) <= 42 for line in lines)


def test_without_timestamps_long_text_becomes_bounded_cues():
    t = Transcript(text=LONG, duration=20.0)
    got = writers.cues(t)
    _check_estimated(got, LONG, 20.0)
    assert [c[2] for c in got] == [
        "Good morning everyone,",  # a sentence too long for one cue breaks at its comma
        "and welcome to the quarterly review of our engineering roadmap.",
        "Today we will cover three topics: the migration of the billing service,",
        "the new on-call rotation, and the hiring plan for next year.",
        "Questions? Please hold them until the end. Thanks.",  # short sentences share a cue
    ]
    assert writers.format_srt(t).startswith(
        "1\n00:00:00,000 --> 00:00:01,654\nGood morning everyone,\n"
        "\n"
        "2\n00:00:01,654 --> 00:00:06,391\nand welcome to the quarterly\nreview of our engineering roadmap.\n"
    )
    assert writers.format_srt(t).endswith(
        "5\n00:00:16,241 --> 00:00:20,000\nQuestions?\nPlease hold them until the end. Thanks.\n")
    tsv = writers.format_tsv(t).splitlines()
    assert tsv[0] == "start\tend\ttext" and len(tsv) == 6
    assert tsv[3] == "6391\t11729\tToday we will cover three topics: the migration of the billing service,"
    vtt = writers.format_vtt(t)
    assert vtt.count(" --> ") == 5 and "00:00:16.241 --> 00:00:20.000\nQuestions?\n" in vtt


def test_without_timestamps_or_punctuation_cues_break_between_words():
    words = [f"word{i}" for i in range(200)]  # pnc off: one endless "sentence"
    text = " ".join(words)
    got = writers.cues(Transcript(text=text, duration=60.0))
    _check_estimated(got, text, 60.0)
    lengths = [len(c[2]) for c in got]
    assert len(got) <= -(-len(text) // 85) + 1  # about as few cues as 2x42 characters allow
    assert max(lengths) - min(lengths) <= 12  # and evenly filled, no stub at the end


def test_without_timestamps_sentences_are_not_split_when_they_fit():
    sentences = ["This sentence is about fifty characters long, yes."] * 3
    got = writers.cues(Transcript(text=" ".join(sentences), duration=3.0))
    assert [c[2] for c in got] == sentences  # two would not fit one cue, so each is its own


def test_without_timestamps_an_overlong_word_and_zero_duration():
    word = "x" * 100
    got = writers.cues(Transcript(text=f"{word} tail", duration=0.0))
    assert [c[2] for c in got] == [word, "tail"]
    assert all(start == end == 0.0 for start, end, _ in got)
    assert writers.format_vtt(Transcript(text="a < b & c > d. " * 8, duration=8.0)).count("&lt;") == 8


def test_timestamps_flag_without_segments_falls_back_to_estimates():
    t = Transcript(text=LONG, duration=20.0, timestamps=True)
    assert writers.cues(t) == writers.cues(Transcript(text=LONG, duration=20.0))


def test_long_segments_are_wrapped_but_keep_their_times():
    first = "and welcome to the quarterly review of our engineering roadmap."
    t = Transcript(text=LONG, duration=30.0, segments=[
        {"start": 1.0, "end": 4.0, "text": first},
        {"start": 4.5, "end": 12.25, "text": LONG},  # too long for two lines: still one cue
    ])
    srt = writers.format_srt(t)
    assert srt.startswith("1\n00:00:01,000 --> 00:00:04,000\nand welcome to the quarterly\n"
                          "review of our engineering roadmap.\n\n2\n00:00:04,500 --> 00:00:12,250\n")
    assert srt.count(" --> ") == 2
    second = srt.split("\n\n")[1].splitlines()[2:]
    assert " ".join(second) == LONG and all(len(line) <= 42 for line in second) and len(second) > 2
    assert writers.format_tsv(t).splitlines()[2] == f"4500\t12250\t{LONG}"  # TSV rows stay one line
    vtt = writers.format_vtt(t)
    assert "00:00:01.000 --> 00:00:04.000\nand welcome to the quarterly\nreview of our engineering roadmap.\n" in vtt


def test_wrap_lines():
    assert writers.wrap_lines("short") == ["short"]
    assert writers.wrap_lines("") == []
    # balanced, unless punctuation offers a break at little cost
    assert writers.wrap_lines("one two three four five six seven eight nine ten eleven") == [
        "one two three four five six", "seven eight nine ten eleven"]
    assert writers.wrap_lines("Questions? Please hold them until the end. Thanks.") == [
        "Questions?", "Please hold them until the end. Thanks."]
    assert writers.wrap_lines("y" * 50 + " z") == ["y" * 50, "z"]


def test_words_are_used_when_there_are_no_segments(timed):
    timed.segments = []
    assert writers.cues(timed) == [(0.0, 0.24, "Hello"), (0.32, 0.72, "world.")]


def test_empty_text_gives_empty_subtitles():
    empty = Transcript(text="", duration=3.0)
    assert writers.format_srt(empty) == ""
    assert writers.format_vtt(empty) == "WEBVTT\n\n"
    assert writers.format_tsv(empty) == "start\tend\ttext\n"


def test_cue_text_is_one_line_and_times_are_sane():
    t = Transcript(text="x", segments=[{"start": 2.0, "end": 1.5, "text": "a\n\nb\tc"},
                                        {"start": -0.01, "end": 0.5, "text": "  "}])
    assert writers.cues(t) == [(2.0, 2.0, "a b c")]  # end clamped to start; blank cue dropped
    assert "\n\n" not in writers.format_srt(t).strip()


def test_nemo_style_keys_are_understood():
    t = Transcript(text="Hi there", segments=[{"start": 0.0, "end": 0.4, "segment": "Hi there",
                                                "start_offset": 0, "end_offset": 5}])
    assert writers.cues(t) == [(0.0, 0.4, "Hi there")]


def test_vtt_escapes_markup():
    t = Transcript(text="a < b & c > d", duration=1.0)
    assert "a &lt; b &amp; c &gt; d" in writers.format_vtt(t)


def test_json(timed):
    data = json.loads(writers.format_json(timed))
    for key in ("text", "tokens", "source_lang", "target_lang", "duration", "model", "segments", "words"):
        assert key in data
    assert data["text"] == timed.text
    assert data["tokens"] == [11, 12, 13]
    assert data["model"] == "canary-test"
    assert data["segments"][1] == {"start": 0.8, "end": 3725.5, "text": "How are you?"}
    assert data["words"][0] == {"start": 0.0, "end": 0.24, "text": "Hello"}
    assert Transcript.from_dict(data) == timed
    lines = writers.format_json(timed).splitlines()
    assert '  "tokens": [11, 12, 13],' in lines
    assert '    {"start": 0.0, "end": 0.72, "text": "Hello world."},' in lines


def test_json_model_fallback_unicode_and_numpy_values(plain):
    plain.text = "Straße, ¿qué?"
    plain.tokens = list(np.array([1, 2], dtype=np.int64))
    plain.segments = [{"start": np.float32(0.5), "end": np.float64(1.0), "text": "Straße"}]
    out = writers.format_json(plain, model="my-model")
    assert "Straße" in out  # not \u-escaped
    data = json.loads(out)
    assert data["model"] == "my-model"
    assert data["tokens"] == [1, 2]
    assert data["segments"][0]["start"] == 0.5
    # Segments imply timestamps, so "words" is there too (empty); no language was identified, no file given.
    assert data["words"] == []
    assert "language" not in data and "path" not in data


def test_json_without_timestamps_has_only_the_core_fields(plain):
    data = json.loads(writers.format_json(plain))
    assert list(data) == ["text", "tokens", "source_lang", "target_lang", "duration", "model"]
    assert data["model"] is None and data["duration"] == 2.5
    back = Transcript.from_dict(data)
    assert back == plain and back.timestamps is False and not back.has_timestamps


def test_json_optional_fields_in_order(plain):
    plain.language = "de"  # identified with source_lang auto
    plain.path = "/data/morgen.wav"
    data = json.loads(writers.format_json(plain, model="m"))
    assert list(data) == ["text", "tokens", "source_lang", "target_lang", "language", "duration", "model", "path"]
    assert data["language"] == "de" and data["path"] == "/data/morgen.wav"


def test_json_timestamps_requested_but_none_produced():
    silent = Transcript(text="", duration=1.0, timestamps=True)
    data = json.loads(writers.format_json(silent))
    assert data["segments"] == [] and data["words"] == []
    assert Transcript.from_dict(data) == silent


def test_json_timestamps_from_lists_without_the_flag(timed):
    timed.timestamps = False  # e.g. built by older code: non-empty lists still mean timestamps
    timed.segments = []
    data = json.loads(writers.format_json(timed))
    assert data["segments"] == [] and len(data["words"]) == 2


def test_json_timed_items_keep_extra_keys():
    t = Transcript(text="Hi there", segments=[{"segment": "Hi there", "end": 0.4, "start": 0.0,
                                               "start_offset": 0.0, "end_offset": 5.5}],
                   words=[{"text": "Hi", "start": 0.0, "end": 0.2, "start_offset": 0, "end_offset": 2}])
    data = json.loads(writers.format_json(t))
    assert data["segments"] == [{"start": 0.0, "end": 0.4, "text": "Hi there", "segment": "Hi there",
                                 "start_offset": 0.0, "end_offset": 5.5}]
    assert list(data["words"][0]) == ["start", "end", "text", "start_offset", "end_offset"]


def test_transcript_to_dict_is_plain(timed):
    d = timed.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["timestamps"] is True and Transcript.from_dict(d) == timed
    assert Transcript(text="x").timestamps is False  # the flag is optional: old callers keep working
    assert timed.task == "asr"
    assert Transcript(text="", source_lang="de", target_lang="en").task == "translate"


def test_accepts_dicts_and_lookalike_objects(timed):
    class Lookalike:
        text = "Hello world. How are you?"
        duration = 1.6
        segments = timed.segments

    assert writers.format_srt(timed.to_dict()) == writers.format_srt(timed)
    assert writers.format_srt(Lookalike()) == writers.format_srt(timed)


def test_write_outputs_all_formats(timed, tmp_path):
    out = tmp_path / "new" / "dir"
    paths = writers.write_outputs(timed, out, "hello", "all")
    assert [p.name for p in paths] == ["hello.txt", "hello.json", "hello.srt", "hello.vtt", "hello.tsv"]
    for p in paths:
        assert p.read_text(encoding="utf-8") == writers.render(timed, p.suffix[1:])
    assert sorted(os.listdir(out)) == sorted(p.name for p in paths)  # no temp files left behind
    mode = stat.S_IMODE(paths[0].stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_expand_formats():
    assert writers.expand_formats("all") == list(writers.FORMATS)
    assert writers.expand_formats("srt, json,srt") == ["srt", "json"]
    assert writers.expand_formats(["txt", "VTT"]) == ["txt", "vtt"]
    with pytest.raises(CanaryError, match="unknown output format 'docx'"):
        writers.expand_formats("txt,docx")
    with pytest.raises(CanaryError, match="unknown output format"):
        writers.render(Transcript(text="x"), "pdf")


def test_write_transcript_infers_format_from_suffix(timed, tmp_path):
    path = writers.write_transcript(timed, tmp_path / "a.vtt")
    assert path.read_text().startswith("WEBVTT")


# -- atomicity ---------------------------------------------------------------------------------------------


def test_failure_mid_write_leaves_no_file(timed, tmp_path, monkeypatch):
    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writers.os, "fsync", disk_full)  # the data is in the temp file when this fails
    with pytest.raises(CanaryError, match=r"could not write .*hello\.json: No space left on device"):
        writers.write_outputs(timed, tmp_path, "hello", "json")
    assert os.listdir(tmp_path) == []


def test_failure_mid_write_keeps_the_old_file(timed, tmp_path, monkeypatch):
    target = tmp_path / "hello.txt"
    target.write_text("old transcript\n")

    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise KeyboardInterrupt  # interrupted halfway through the write

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(writers.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    with pytest.raises(KeyboardInterrupt):
        writers.write_transcript(timed, target)
    assert target.read_text() == "old transcript\n"
    assert os.listdir(tmp_path) == ["hello.txt"]


def test_failed_rename_cleans_up(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(writers.os, "replace", refuse)
    with pytest.raises(PermissionError):
        writers.atomic_write(tmp_path / "x.txt", "data")
    assert os.listdir(tmp_path) == []


def test_overwrite_keeps_existing_permissions(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("old")
    target.chmod(0o640)
    writers.atomic_write(target, "new")
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_unwritable_output_directory(timed, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CanaryError, match="could not create output directory"):
        writers.write_outputs(timed, blocker / "sub", "hello", "txt")
