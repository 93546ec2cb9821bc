"""The shared replication pipeline: tune -> train tiers -> measure -> predict -> report.

``workload.py`` is the contract each replication (``examples.toy``, ``examples.speedrun``) fulfils.
"""
from .workload import Workload

__all__ = ["Workload"]
