"""The speedrun replication on the NanoGPT variant zoo (issue #11): ``python -m examples.speedrun --preset ...``.

* :mod:`~examples.speedrun.presets`: ``tiny`` (tests), ``cpu``, ``gpu-small``, ``paper-d12``, each with its
  pre-registered target loss.
* :mod:`~examples.speedrun.workload`: :class:`ZooWorkload`, the zoo as a replication workload.
* :mod:`~examples.speedrun.trainable`: :class:`ZooTrainable`, the tuner's view of the zoo.
* :mod:`~examples.speedrun.halving`: per-tier learning-rate selection (synchronized successive halving).
* :mod:`~examples.speedrun.pipeline`: tune -> train -> predict -> report, resumable.
* :mod:`~examples.speedrun.summary`: the replication verdict beside the paper's numbers.
"""
from .presets import PRESETS, Preset, get_preset

__all__ = ["PRESETS", "Preset", "get_preset"]
