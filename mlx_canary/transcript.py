"""The ``Transcript`` result type: what transcription returns and what the writers and the CLI consume.

Timestamps are in seconds from the start of the input. ``segments`` and ``words`` are lists of dicts with at
least ``start``, ``end`` and ``text`` (extra keys such as NeMo's ``start_offset``/``end_offset`` frame indices
are kept and written to JSON as they are); both are empty when timestamps were not requested.
``timestamps`` says whether they were requested: the writers put ``segments``/``words`` in JSON when it is set
or when either list is non-empty (so a transcript built without the flag still writes its timestamps).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Transcript:
    text: str
    tokens: list[int] = field(default_factory=list)  # generated ids after the prompt, without EOS
    source_lang: str = ""
    target_lang: str = ""
    duration: float = 0.0  # seconds of audio transcribed
    segments: list[dict] = field(default_factory=list)  # [{"start", "end", "text", ...}]
    words: list[dict] = field(default_factory=list)  # [{"start", "end", "text", ...}]
    language: Optional[str] = None  # detected language, when the model reports one
    path: Optional[str] = None  # the input this came from, when it was a file
    model: Optional[str] = None  # the model that produced it (name, directory or repo id)
    timestamps: bool = False  # timestamps were requested (segments/words may still be empty, e.g. silence)

    @property
    def has_timestamps(self) -> bool:
        """Timestamps were requested or produced: JSON carries ``segments``/``words`` exactly when this holds."""
        return bool(self.timestamps or self.segments or self.words)

    @property
    def task(self) -> str:
        """``"asr"`` when source and target language agree, else ``"translate"``."""
        return "asr" if not self.target_lang or self.target_lang == self.source_lang else "translate"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (plain Python types only)."""
        data = dataclasses.asdict(self)
        data["text"] = str(self.text)
        data["tokens"] = [int(t) for t in self.tokens]
        data["duration"] = float(self.duration)
        data["timestamps"] = bool(self.timestamps)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Transcript":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "timestamps" not in values:
            # The JSON writer has no flag: it writes segments/words exactly when timestamps were requested.
            values["timestamps"] = "segments" in data or "words" in data
        return cls(**values)
