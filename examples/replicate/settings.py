"""The output directory's settings record: ``OUT/preset.json`` holds every field of the preset it was made with.

A replication resumes by running the same command again; :func:`check_settings` makes sure the rerun
uses the same settings as the results already in ``OUT`` (tuning choices, run records), so results
made with different settings are never mixed. Shared by ``examples.toy`` and ``examples.speedrun``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

__all__ = ["check_settings", "settings_of", "holds_other_files"]

#: The temporary file of an atomic write of ``preset.json`` (``write_atomic``: ``.<name>.<uuid hex>.tmp``).
_PRESET_TEMPORARY = re.compile(r"\.preset\.json\.[0-9a-f]{32}\.tmp")


#: The lock file a running job holds in its output directory (``examples.replicate.pipeline.job_lock``).
LOCK_FILE = ".replicate.lock"


def holds_other_files(out: Path) -> bool:
    """Whether ``out`` is a directory holding anything but ``preset.json`` being written (the temporary file a
    first call killed while writing it leaves; ``out`` is then still a fresh output directory) and the job's
    lock file (taken before ``preset.json`` is written)."""
    out = Path(out)
    return out.is_dir() and any(not _PRESET_TEMPORARY.fullmatch(p.name) and p.name != LOCK_FILE
                                for p in out.iterdir())

#: Preset fields that do not change any result (a planned wall time for the ETA): not compared.
INFORMATIONAL = frozenset({"expected_minutes"})


def settings_of(preset) -> dict:
    """The preset (a dataclass) as the JSON object ``preset.json`` holds (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(preset)))


def _diff(have, want, prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ (nested settings such as ``tuner.rungs`` by name)."""
    if isinstance(have, dict) and isinstance(want, dict):
        out = []
        for k in sorted(set(have) | set(want)):
            if k not in have or k not in want:
                out.append(prefix + k)
            else:
                out.extend(_diff(have[k], want[k], f"{prefix}{k}."))
        return out
    return [] if have == want else [prefix.rstrip(".")]


def check_settings(out: Path, preset, what: str = "run") -> None:
    """Write ``out/preset.json``, or refuse (``ValueError``, one line) an output directory made with other settings.

    ``out`` must be a directory (it is created when missing). An unreadable or malformed
    ``preset.json`` is refused too, naming the file. ``what`` names the replication in messages.
    """
    from spectral_lens.atomic import write_text_atomic

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is not a directory; use a new --out")
    path = out / "preset.json"
    want = settings_of(preset)
    if path.exists() or path.is_symlink():
        try:
            have = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
            raise ValueError(f"{path} cannot be read as the settings of a {what} ({reason}); use a new --out") from None
        if not isinstance(have, dict):
            raise ValueError(f"{path} holds a JSON {type(have).__name__}, expected the settings object of a {what}; "
                             "use a new --out")
        if set(have) == {"preset"} and "preset" not in want:  # written before every setting was recorded
            if have["preset"] != want.get("name"):
                raise ValueError(f"{out} holds a {what} made with other settings (the preset name "
                                 f"{have['preset']!r}, not {want.get('name')!r}); use a new --out or the same preset")
            raise ValueError(f"{path} records only the preset name ({have['preset']!r}), as older versions wrote "
                             f"it, so whether the {what}'s results match the current settings cannot be checked; "
                             "use a new --out")
        diff = [k for k in _diff(have, want) if k not in INFORMATIONAL]
        if diff:
            raise ValueError(f"{out} holds a {what} made with other settings (differs in: {', '.join(diff)}); "
                             "use a new --out or the same preset")
    else:
        out.mkdir(parents=True, exist_ok=True)
        for p in out.iterdir():  # left by a first call killed while writing preset.json
            if _PRESET_TEMPORARY.fullmatch(p.name):
                p.unlink(missing_ok=True)
        write_text_atomic(path, json.dumps(want, indent=1) + "\n")


def refuse_torchrun(name: str) -> None:
    """Refuse (``ValueError``) to start a replication under torchrun: it runs in one process (each run trains on one
    device), and under torchrun every rank would run the whole pipeline (rank 1 stopped on the directory's lock
    while rank 0's first training run waited for it in ``init_process_group`` until the process-group timeout)."""
    world = os.environ.get("WORLD_SIZE", "1").strip()
    if world not in ("", "0", "1"):
        raise ValueError(f"{name} runs in one process (each run trains on one device), but WORLD_SIZE={world} "
                         "(started by torchrun?): run it with python -m, not torchrun")
