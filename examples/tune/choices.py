"""The chosen learning rate per family/tier: a small JSON file the replications read.

Format (``version`` 1)::

    {"version": 1, "study_name": "...", "mode": "synchronized", "rungs": [...],
     "choices": [{"family": "RoPE", "tier": 32, "scale": 2.0, "lrs": {"adam": 0.0012},
                  "origins": [["sqrt", 1.0], ["linear", 0.5]], "loss": 3.41, "at_edge": null}, ...]}

``at_edge`` is ``"lowest"`` or ``"highest"`` when the choice is an end of its candidate grid (the best
rate may lie beyond it), else ``null``.

Written atomically (temporary file in the same directory, fsync, rename).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from .trainable import Candidate

__all__ = ["Choices", "write_choices", "load_choices"]

VERSION = 1


class Choices(dict):
    """``dict[(family, tier), Candidate]`` whose missing keys raise a ``KeyError`` naming the file and what it holds."""

    source: str = "<memory>"

    def __missing__(self, key):
        have = ", ".join(f"{f}/b{t}" for f, t in sorted(self)) or "nothing"
        raise KeyError(f"{self.source}: no chosen learning rate for family/tier {key!r}; the file has {have}")


def write_choices(path: Path, choices: Mapping[tuple[str, int], Candidate], *, losses: Mapping[tuple[str, int], float],
                  meta: Mapping[str, Any], at_edge: Mapping[tuple[str, int], str] | None = None) -> None:
    """Write the chosen candidate of every family/tier (with its final-rung loss and, when it is the
    smallest or largest candidate of its grid, ``at_edge``: ``"lowest"`` / ``"highest"``) to ``path``."""
    rows = []
    for (family, tier), c in sorted(choices.items()):
        loss = losses.get((family, tier), float("nan"))
        rows.append(dict(family=family, tier=tier, scale=c.scale, lrs=dict(c.lrs),
                         origins=[list(o) for o in c.origins], key=c.key,
                         loss=loss if math.isfinite(loss) else None,
                         at_edge=(at_edge or {}).get((family, tier))))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # imported here: spectral_lens imports torch (seconds), and `python -m examples.tune` imports this
    # package before its main() can turn a Ctrl-C or SIGTERM meanwhile into one line (it was a traceback)
    from spectral_lens.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(dict(version=VERSION, **meta, choices=rows), indent=2) + "\n")


def _bad(path, msg):
    return ValueError(f"choices file {str(path)!r}: {msg}")


def load_choices(path: os.PathLike | str) -> Choices:
    """Read a choices file: ``{(family, tier): Candidate}`` (a :class:`Choices`).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not JSON, another version, or a malformed row (the message names the row).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"choices file {str(path)!r} does not exist; run the tuner first "
                                "(python -m examples.tune ...)") from None
    except json.JSONDecodeError as e:
        raise _bad(path, f"not JSON ({e})") from None
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise _bad(path, f"expected a JSON object with version {VERSION}, got version "
                         f"{data.get('version') if isinstance(data, dict) else type(data).__name__!r}")
    rows: Iterable = data.get("choices")
    if not isinstance(rows, list):
        raise _bad(path, "'choices' must be a list")
    out = Choices()
    out.source = str(path)
    for i, r in enumerate(rows):
        try:
            c = Candidate(family=str(r["family"]), tier=int(r["tier"]), scale=float(r["scale"]),
                          lrs={str(k): float(v) for k, v in r["lrs"].items()},
                          origins=tuple((str(a), float(b)) for a, b in r.get("origins", [])))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise _bad(path, f"choice #{i} is malformed ({type(e).__name__}: {e}): {r!r}") from None
        bad = [f"tier {r['tier']!r} (expected an int >= 1)"] if isinstance(r["tier"], bool) or c.tier < 1 \
            or c.tier != r["tier"] else []
        bad += [f"{name} {v!r} (expected a finite rate > 0)" for name, v in
                [("scale", c.scale)] + [(f"lrs[{g!r}]", lr) for g, lr in c.lrs.items()]
                if not (math.isfinite(v) and v > 0)]
        if bad or not c.lrs:
            raise _bad(path, f"choice #{i} is malformed ({'; '.join(bad) or 'no rates in lrs'}): {r!r}")
        if (c.family, c.tier) in out:
            raise _bad(path, f"family/tier {c.family}/b{c.tier} is chosen twice")
        out[(c.family, c.tier)] = c
    return out
