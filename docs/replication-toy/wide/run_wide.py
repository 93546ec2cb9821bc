"""Follow-up to the toy cpu run: the tuner's grid extended one octave upwards (x 2*sqrt2, x 4), because
the cpu run chose the highest candidate at B = 64, 128, 256. Everything else as the cpu preset.

Run from the repository root: ``PYTHONPATH=. python docs/replication-toy/wide/run_wide.py runs/toy-wide``.
"""
import dataclasses
import math
import sys

import examples.toy.__main__ as toy_main
from examples.toy.presets import PRESETS

if __name__ == "__main__":
    p = PRESETS["cpu"]
    r2 = math.sqrt(2)
    wide = dataclasses.replace(p, name="cpu-wide", tuner=dataclasses.replace(p.tuner, multipliers=(0.5, 1 / r2, 1.0, r2, 2.0, 2 * r2, 4.0)))
    toy_main.PRESETS["cpu-wide"] = wide
    sys.exit(toy_main.main(["--preset", "cpu-wide", "--out", sys.argv[1]]))
