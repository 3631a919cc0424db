"""Golden data: PyTorch reference tensors by module path, the clip they are taken on, tolerances.

`capture` (needs torch and openai-whisper) runs stock openai-whisper and records each module's
output under its module path; `tolerances` reads the one file that says how close is close
enough, and why; `word_edits` counts the word errors of a transcript against its reference.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

DATA = Path(__file__).parent / "data"
JFK_WAV = DATA / "jfk.wav"
TOLERANCES = Path(__file__).parent / "tolerances.json"


def tolerance(name: str, dtype: str = "float32") -> tuple[float, str]:
    """(max error relative to the reference tensor's scale, reason) for a parity entry."""
    table = json.loads(TOLERANCES.read_text())
    if dtype not in table:
        raise KeyError(f"{TOLERANCES}: no tolerances for dtype {dtype!r} (has {sorted(table)})")
    for entry in table[dtype]:
        if fnmatch.fnmatchcase(name, entry["match"]):
            return float(entry["rel"]), entry["reason"]
    raise KeyError(f"{TOLERANCES}: no {dtype} entry matches {name!r}")


def word_edits(ref: list[str], hyp: list[str]) -> int:
    """Levenshtein distance over words (substitutions, deletions, insertions)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]
