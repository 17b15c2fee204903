"""lm-eval tasks shipped with qbara (offline, local data, in TASKS_DIR; `qbara eval` always includes them).

qbara_shakespeare_next_line (multiple choice): two lines of a speech, then the true next line against three
lines from elsewhere in the same play. The shipped JSONL is what `next_line_items()` builds.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from qbara.data import shakespeare_text

TASKS_DIR = Path(__file__).parent / "tasks"
NEXT_LINE_TASK = "qbara_shakespeare_next_line"
NEXT_LINE_DATA = TASKS_DIR / "shakespeare_next_line.jsonl"
_NEXT_LINE_PLAYS = ("macbeth", "othello", "lear", "tempest")
_PER_PLAY = 30
_MIN_CHARS = 20  # lines shorter than this ("Ay.") are too easy to tell apart, or to confuse


def _speech_lines(text: str) -> list[list[str]]:
    """The spoken lines of each speech (a blank-line block opened by "SPEAKER."), stage directions dropped."""
    speeches = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.strip("\n").splitlines()]
        if len(lines) < 2 or not lines[0].endswith(".") or lines[0].startswith("["):
            continue
        spoken = [line for line in lines[1:] if line and not line.startswith("[")]
        if spoken:
            speeches.append(spoken)
    return speeches


def next_line_items(plays=_NEXT_LINE_PLAYS, per_play: int = _PER_PLAY, seed: int = 0) -> list[dict]:
    """The task's records: {"play", "context", "choices", "answer"} (answer: index of the true next line)."""
    rng = random.Random(seed)
    items = []
    for play in plays:
        speeches = _speech_lines(shakespeare_text(play))
        pool = sorted({line for s in speeches for line in s if len(line) >= _MIN_CHARS})
        windows = [s[i:i + 3] for s in speeches for i in range(len(s) - 2)
                   if all(len(line) >= _MIN_CHARS for line in s[i:i + 3])]
        for window in rng.sample(windows, per_play):
            distractors = rng.sample([line for line in pool if line not in window], 3)
            answer = rng.randrange(4)
            choices = distractors[:answer] + [window[2]] + distractors[answer:]
            items.append({"play": play, "context": "\n".join(window[:2]), "choices": choices, "answer": answer})
    return items


def _write_next_line_data(path: Path = NEXT_LINE_DATA) -> Path:
    """(Re)build the shipped JSONL."""
    path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in next_line_items()),
                    encoding="utf-8")
    return path


if __name__ == "__main__":  # python -m qbara.eval.bundled: rebuild the shipped data
    print(_write_next_line_data())
