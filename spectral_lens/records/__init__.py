"""Run records: one directory per training run, plain files, no pickle.

Layout of a run directory::

    RUN_DIR/
      run.json            metadata (RunInfo), written once atomically (temp file + rename)
      log.jsonl           append-only scalar events: step, tokens, train/val loss, tokens/s, ...
      measurements.jsonl  one line per spectral measurement: step, tokens, progress, val loss,
                          per-spectrum summaries and the relative file names of the spectra
      spectra/<step>_<name>.npz   one Spectrum per file (Spectrum.save: eigenvalues + JSON header)

Durability and concurrent reading. :class:`RunWriter` writes every spectrum of a measurement to a
temporary name, fsyncs it and renames it into place *before* it appends the JSONL line that refers to
it; each JSONL line is written with one ``write`` call on an ``O_APPEND`` descriptor, then fsynced.
So a reader in another process, while the run is still going, never sees a line whose spectrum
files are missing; at worst it sees a last line that is not yet complete, which it skips.

Reading (:meth:`RunRecord.open`): a last line cut off without its newline (crash mid-write, or a
write in progress) is skipped with a :class:`RecordWarning`, while a complete JSON object that only
lacks its newline is kept; every earlier line is kept. A corrupted line in
the middle, a line that is not a JSON object, or a missing spectrum file raises
:class:`RecordFormatError` naming the file and the 1-based line number; ``errors="skip"`` skips such
lines with a warning instead. A corrupted spectrum file is detected when it is loaded (lazily, on
first access), or at open time with ``verify=True``.

JSON notes: non-finite floats (a diverged run's ``NaN`` loss) are written the way Python's ``json``
writes them (``NaN``, ``Infinity``), which Python and pandas read back but strict JSON parsers reject.
"""

from __future__ import annotations

from .reader import RunRecord, open_runs, runs_table
from .schema import Measurement, RecordFormatError, RecordWarning, RunInfo, spectrum_summaries
from .writer import RunWriter

__all__ = [
    "RunInfo",
    "Measurement",
    "RunRecord",
    "RunWriter",
    "RecordFormatError",
    "RecordWarning",
    "open_runs",
    "runs_table",
    "spectrum_summaries",
]
