"""Review 24 (probe2): every "other matrix" that a refusal suggests binds and measures, and none is left out.

Over the review's audit settings (test_review24_probe_audit.py: ZeRO-3, FSDP2, Accelerate's offloading, BatchNorm,
tied weights, a sequence-first layer, LoHa, FSDP1, and combinations), each parameter and each engine: a refusal that
names another matrix ("probe other matrices that have a fast path (such as X; ...)", "probe another matrix ...
(such as X, if ...)") names one that ``engine='auto'`` and ``'fast'`` measure; a refusal that lists remedies
("Instead: ...", ZeRO-3, FSDP2, offloading) for a parameter the fast engine cannot measure suggests the fast engine
for another matrix wherever some matrix of another module measures with it (before: dropped whenever the refused
parameter's own fast path could not run).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest


def _audit():
    """The review's audit module, loaded from its file (pytest imports tests by path)."""
    spec = importlib.util.spec_from_file_location("review24_probe_audit_2", Path(__file__).with_name(
        "test_review24_probe_audit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


AUDIT = _audit()
SETTINGS = AUDIT.SETTINGS + ["fsdp2+tied", "offload+tied+seq_first", "zero3+tied+seq_first"]
MATRICES = ("o.weight", "emb.weight", "head.weight")  # the audit's parameters, each in its own module


@pytest.mark.slow  # ~400 binds and passes over peft/accelerate models (~15 s)
@pytest.mark.parametrize("setting", SETTINGS)
def test_every_suggested_other_matrix_measures(setting):
    got = {(p, e): AUDIT.outcome(setting, p, e) for p in AUDIT.PARAMS for e in AUDIT.ENGINES}
    fast = {p for p in MATRICES if all(got[p, e][0] == "measured" for e in ("auto", "fast"))}  # measured by both
    for (param, engine), (stage, message) in got.items():
        if message is None:
            continue
        where = f"{setting} {param} engine={engine!r} ({stage}): {message}"
        named = re.findall(r"probe (?:other matrices that have|another matrix that has) a fast path \(such as "
                           r"([\w.]+)[;,]", message)  # "(such as X; ...)", "(such as X, if ...)"
        for other in {n.removeprefix("base_model.model.") for n in named}:  # PEFT's prefix
            assert other != param, where
            # measured; or, refused at binding, found sequence-first in the pass, as the hint's "batch-first" warns
            assert other in fast or (stage == "bind" and got[other, "fast"][0] == "pass"
                                     and "sample index in dimension 0" in got[other, "fast"][1]), where
        if ("Instead: " in message and "fsdp1" not in setting and param not in fast and fast - {param}
                and "no engine can measure" not in message):
            assert "engine='auto' or 'fast'" in message, where  # for this parameter or another matrix
