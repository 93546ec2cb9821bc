"""Counting what tests read from files."""
from __future__ import annotations

import builtins
import pathlib


def bytes_read(monkeypatch, name):
    """Bytes read from files called ``name`` (through open() or Path.read_bytes)."""
    counted = [0]
    real_open, real_read_bytes = builtins.open, pathlib.Path.read_bytes

    class Counting:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def read(self, *args):
            data = self.fh.read(*args)
            counted[0] += len(data)
            return data

        def __getattr__(self, key):
            return getattr(self.fh, key)

    def counting_open(file, *args, **kw):
        fh = real_open(file, *args, **kw)
        return Counting(fh) if pathlib.Path(str(file)).name == name else fh

    def counting_read_bytes(self):
        data = real_read_bytes(self)
        if self.name == name:
            counted[0] += len(data)
        return data

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(pathlib.Path, "read_bytes", counting_read_bytes)
    return counted
