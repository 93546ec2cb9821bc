"""The run writer's incremental reader of its JSONL files: the steps (and validation-loss steps) of their
whole lines, read once, then only what was appended since (``RunWriter.has_measurement``,
``measured_steps``, ``val_loss_steps``, the orphan scan on resume)."""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _is_val_loss(line: Mapping[str, Any]) -> bool:
    """Whether the line's ``val_loss`` is a number (not a bool)."""
    v = line.get("val_loss")
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


class _Scan:
    """What :meth:`RunWriter._scan` read of one JSONL file: its identity ``(st_dev, st_ino)``, the offset
    read to (after the last whole line), the up to 256 bytes before it, and the integer steps of the lines
    that are JSON objects: all of them (``measurements.jsonl`` only) and those with a numeric
    ``val_loss``."""

    __slots__ = ("before", "ident", "measurements", "offset", "steps", "val_steps")

    def __init__(self, ident: tuple[int, int] | None = None, *, measurements: bool) -> None:
        self.ident, self.offset, self.before, self.measurements = ident, 0, b"", measurements
        self.steps: set[int] = set()
        self.val_steps: set[int] = set()

    def add(self, obj: Mapping[str, Any] | None) -> None:
        """Count one whole line (its JSON object, or ``None``)."""
        step = None if obj is None else _int_step(obj)
        if step is None:
            return
        if self.measurements:
            self.steps.add(step)
        if _is_val_loss(obj):
            self.val_steps.add(step)


def _json_object(raw: bytes) -> dict[str, Any] | None:
    """The JSON object on one line, or ``None`` (blank, not JSON, not an object)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def _int_step(line: Mapping[str, Any]) -> int | None:
    """The line's ``step`` when it is an integer (not a bool), else ``None``."""
    step = line.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _scan_file(file: Path, scan: _Scan | None, *, measurements: bool, visit=None) -> tuple[_Scan, bytes]:
    """``scan`` (the read of the JSONL ``file`` so far, ``None``: none) brought up to date, with the bytes after
    the file's last newline. Only the bytes from the offset read to are parsed when it is the same file (its
    identity) and the 256 bytes before that offset are unchanged (it was only appended to); else the file is
    read from its start, into a new :class:`_Scan`. ``visit(raw, obj)`` sees each whole line read (``obj``:
    its JSON object, or ``None``). A file that does not exist reads as empty (a new scan without identity)."""
    if not file.exists():
        return _Scan(measurements=measurements), b""
    with open(file, "rb") as fh:
        st = os.fstat(fh.fileno())
        ident = (st.st_dev, st.st_ino)
        same = scan is not None and scan.ident == ident and scan.offset <= st.st_size
        if same and scan.before:
            fh.seek(scan.offset - len(scan.before))
            same = fh.read(len(scan.before)) == scan.before
        if not same:
            scan = _Scan(ident, measurements=measurements)
        fh.seek(scan.offset)
        chunk = fh.read()
    end = chunk.rfind(b"\n") + 1  # whole lines only
    for raw in chunk[:end].split(b"\n")[:-1]:  # lines end at b"\n" only, as RunRecord.open reads them
        obj = _json_object(raw)
        scan.add(obj)
        if visit is not None:
            visit(raw, obj)
    scan.offset += end
    scan.before = (scan.before + chunk[max(0, end - 256):end])[-256:]
    return scan, chunk[end:]
