"""The speedrun replication on the NanoGPT variant zoo (issue #11): ``python -m examples.speedrun --preset ...``.

It is the shared replication pipeline (:func:`examples.replicate.replicate`; tuning by
:func:`examples.tune.tune` with the zoo's :class:`examples.tune.zoo.ZooTrainable`) configured by:

* :mod:`~examples.speedrun.presets`: ``tiny`` (tests), ``cpu``, ``gpu-small``, ``paper-d12``, each with its
  pre-registered target loss.
* :mod:`~examples.speedrun.workload`: :class:`ZooWorkload`, the zoo as a replication workload.
* :mod:`~examples.speedrun.summary`: the speedrun's report sections (ours beside the paper's numbers).
"""
from .presets import PRESETS, Preset, get_preset

__all__ = ["PRESETS", "Preset", "get_preset"]
