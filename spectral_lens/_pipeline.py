"""Pipeline parallelism (``torch.distributed.pipelining``), duck-typed: never imported at module import time.

* :func:`metadata_inference`: whether the current forward is a pipeline stage's metadata (shape) inference,
  which runs the stage's module once on the first microbatch (the first stage) or on uninitialized
  ``torch.empty`` tensors (the other stages) at a schedule's first ``step``/``eval`` and at every switch
  between them. A capture's hook reads nothing there: those rows are a duplicate or garbage.
* :func:`pipeline_stage`: the ``PipelineStage`` that holds a module, if any (the lens's and the probe's checks).
"""

from __future__ import annotations

import contextlib
import gc
import re
import sys

from torch import nn

# torch >= 2.10, and before; and a stage's constructor: torch < 2.6's PipelineStage(..., input_args) without
# output_args runs the module on torch.empty copies of input_args there
_INFERENCE_NAMES = ("_forward_metadata_inference", "_shape_inference", "__init__")
_codes: frozenset | None = None


def _inference_codes() -> frozenset:
    global _codes
    if _codes is None:
        stage = sys.modules.get("torch.distributed.pipelining.stage")
        found = set()
        for cls in vars(stage).values() if stage is not None else ():
            for name in _INFERENCE_NAMES:
                fn = getattr(cls, name, None) if isinstance(cls, type) and cls.__module__ == stage.__name__ else None
                if getattr(fn, "__code__", None) is not None:
                    found.add(fn.__code__)
        _codes = frozenset(found)
    return _codes


def metadata_inference() -> bool:
    """Whether a pipeline stage's metadata inference runs this forward (a frame of it on the stack)."""
    if "torch.distributed.pipelining.stage" not in sys.modules:  # the common case: one dict lookup
        return False
    codes = _inference_codes()
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


def pipeline_stage(model: nn.Module):
    """The pipeline stage object (``PipelineStage``, or the stage ``build_stage`` makes from a ``pipeline()``
    split) whose ``submod`` is ``model``, or ``None``; only looked for once ``torch.distributed.pipelining``
    is imported and a process group is up. Found through the module's referrers (``gc``: one scan of the
    heap's tracked objects, when a lens or a probe is built)."""
    if "torch.distributed.pipelining.stage" not in sys.modules:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):  # a stage needs a process group
        return None
    for obj in gc.get_referrers(model):  # the stage itself (its attributes inline, Python >= 3.11) or its __dict__
        owners = gc.get_referrers(obj) if isinstance(obj, dict) and obj.get("submod") is model else [obj]
        for owner in owners:
            if (getattr(owner, "submod", None) is model and hasattr(owner, "num_stages")
                    and type(owner).__module__.startswith("torch.distributed.pipelining")):
                return owner
    return None


def describe(stage) -> str:
    return (f"stage {stage.stage_index} of {stage.num_stages} of a pipeline ({type(stage).__name__}, "
            "torch.distributed.pipelining)")


def refuse_probe(model: nn.Module, who: str) -> None:
    """A per-sample gradient of a stage's matrix needs the per-sample loss of the whole pipeline: refused."""
    stage = pipeline_stage(model)
    if stage is not None and stage.num_stages > 1:
        raise ValueError(
            f"{who}: the model is {describe(stage)}; a per-sample gradient needs each sample's loss, which only "
            "the whole pipeline computes (this stage's forward takes the previous stage's activations, or gives "
            "the next stage's), so the gradient protocol cannot run on a stage. Measure activations only "
            "(SpectralLens(..., params=()), or sl.attach with your schedule), or probe an unsplit copy of the "
            "model"
        )


def stage_ranks(stage) -> list[int]:
    """The global ranks of the stage's pipeline (its ``group``; ``None``: the world)."""
    import torch.distributed as dist

    return dist.get_process_group_ranks(stage.group if stage.group is not None else dist.group.WORLD)


def whole_pipeline(stage, group, who: str = "SpectralLens") -> bool:
    """How the lens's ``group`` meets the stage's pipeline: ``True`` when it is exactly the pipeline's ranks
    (every rank runs every batch through the schedule together, each measuring the layers it holds),
    ``False`` when it holds this rank alone of them (a data-parallel group of the ranks holding this stage:
    the usual split of the pool and sum); ``ValueError`` otherwise (the pool split across stages of one
    pipeline would feed each stage another stage's batches)."""
    import torch.distributed as dist

    members = sorted(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))
    pipe = sorted(stage_ranks(stage))
    if members == pipe:
        return True
    inside = sorted(set(members) & set(pipe))
    if len(inside) <= 1:
        return False
    raise ValueError(
        f"{who}: the model is {describe(stage)}, and the lens's group (global ranks {members}) holds the "
        f"pipeline's ranks {inside} together with other ranks. The stages of one pipeline run every batch "
        "together through the schedule, so the lens cannot split the pool across them. Pass group= the "
        "pipeline's group when there is one pipeline, or the data-parallel group of this stage's ranks (e.g. "
        "device_mesh['dp'].get_group() of a (pp, dp) mesh)"
    )


def merge_stages(stage, spectra: dict, missing: list, layers_spec, blocks: int) -> tuple[dict, int]:
    """Every stage's spectra on every rank of the pipeline (one ``all_gather_object`` over its group), so
    that each measurement, and the record rank 0 writes, holds the whole model's layers. ``missing``: the
    positions of the targets of ``layers=`` that match no module of this stage (compared by position, the same on
    every rank: before, a callable's or module's ``repr`` was compared, which holds an address that differs
    between ranks, so a callable matching no stage was never refused); one that matches none on any stage, or a
    name measured on two stages, is a ``ValueError`` on every rank (all see the same gathered lists).
    ``blocks``: how many blocks this stage holds; returns the spectra and the whole model's depth (the
    default tail window's scale rule)."""
    import torch.distributed as dist

    group = stage.group
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (stage.stage_index, spectra, missing, blocks), group=group)
    merged: dict = {}
    for index, theirs, _, _ in sorted(gathered, key=lambda g: g[0]):
        twice = sorted(set(merged) & set(theirs))
        if twice:
            raise ValueError(
                f"SpectralLens: {twice} measured on two pipeline stages (stage {index} and an earlier one); "
                "each stage's modules must have names of their own (as the unsplit model's)"
            )
        merged.update(theirs)
    nowhere = [target_label(layers_spec, i) for i in missing
               if all(i in theirs_missing for _, _, theirs_missing, _ in gathered)]
    if nowhere:
        raise ValueError(
            f"SpectralLens layers={layers_spec!r}: {nowhere} match no module of any pipeline stage; "
            "every stage resolves the layers it holds"
        )
    return merged, sum(g[3] for g in gathered)


def target_label(layers_spec, i: int) -> str:
    """Entry ``i`` of ``layers=`` for messages, the same on every rank: a name or glob as typed, a regex's
    pattern, a module's or callable's kind and position (never a ``repr`` holding an address)."""
    targets = list(layers_spec) if isinstance(layers_spec, (list, tuple)) else [layers_spec]
    t = targets[i]
    if isinstance(t, str):
        return t
    if isinstance(t, re.Pattern):
        return f"re.compile({t.pattern!r})"
    kind = f"{type(t).__name__} module" if isinstance(t, nn.Module) else getattr(t, "__qualname__", type(t).__name__)
    return f"layers[{i}] ({kind})" if isinstance(layers_spec, (list, tuple)) else f"layers ({kind})"


def stage_blocks(model: nn.Module) -> list[str]:
    """The blocks a stage holds, for ``layers="all"`` and ``None``: the lens's layer stack
    (:func:`~spectral_lens.all_blocks`; torchtitan's ``ModuleDict`` keeps the unsplit model's names, so
    ``layers.4`` stays ``layers.4`` on the stage holding it); ``[]`` for a stage that holds no block (only
    the embedding or the head)."""
    from ._blocks import all_blocks

    try:
        return all_blocks(model)
    except ValueError:
        return []


@contextlib.contextmanager
def grads_set_aside(model: nn.Module):
    """The parameters' ``.grad`` set to ``None`` while the schedule runs the measurement's forwards, then put
    back (the same tensors, untouched): a schedule's ``eval()`` ends like a training step, in
    ``perform_reduce_grad``, which divides every ``.grad`` of the stage by the number of microbatches in place
    (torch 2.13's ``ScheduleGPipe``, ``Schedule1F1B``), so a measurement between the backward and the optimizer
    step would change the step."""
    params = list(model.parameters())
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, g in zip(params, saved):
            p.grad = g
