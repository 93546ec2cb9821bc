"""The lens's agreement under ``torch.distributed``: before each collective phase the ranks of a
``group`` agree on whether their local work succeeded, on the layers they measure and the batches
their pools gave, and on what rank 0 alone knows, so that no rank waits in a collective until the
process-group timeout. Used by :class:`~spectral_lens.SpectralLens` and the integrations' driver;
``group=None`` is the whole world. (The accumulator's own agreement is in ``_sync``.)
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import warnings

import torch

from ._warnings import NonFiniteError

_OUT_OF_STEP = "_spectral_lens_out_of_step"
TIMEOUT_ADVICE = (
    "init_process_group(timeout=...), 30 min by default for gloo and 10 min for NCCL; set one you are prepared "
    "to wait. Under NCCL, TORCH_NCCL_ASYNC_ERROR_HANDLING (on by default) makes the watchdog abort a rank whose "
    "collective timed out"
)


def ranks(group) -> tuple[int, int]:
    """``(rank in group, group size)``, or ``(0, 1)`` when ``torch.distributed`` is not initialized."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank(group)
        if rank < 0:  # not a member: get_rank/get_world_size give -1 and collectives are no-ops
            raise ValueError(
                f"SpectralLens: global rank {dist.get_rank()} is not a member of the lens's group=; "
                "call measure only on the group's member ranks (or build this rank's lens without group=)"
            )
        return rank, dist.get_world_size(group)
    return 0, 1


def collective_device(group, model=None) -> torch.device:
    """Where the group's collectives take tensors, one device per rank for a whole measurement. Not NCCL: the
    CPU. NCCL: the device the process group is bound to (:func:`bound_device`); else the one CUDA device holding
    ``model``'s parameters and buffers (:func:`model_cuda_device`; ``model``: the lens's, a hint at this rank's
    GPU); else the current CUDA device (``torch.cuda.set_device``). Why: NCCL makes one communicator per device,
    formed by every rank, whose ranks must be on different GPUs (a model moved to ``cuda:{local_rank}`` without
    ``set_device`` leaves the current device ``cuda:0`` on every rank: two ranks on one GPU fail or wait), and a
    group bound with ``device_id=`` takes collectives on that device only."""
    return _device(group, model, guess=False)


def _device(group, model, guess: bool) -> torch.device:
    """:func:`collective_device` (``guess``: :func:`built_device`, guessing ``LOCAL_RANK``'s GPU where CUDA is
    not initialized yet)."""
    import os

    import torch.distributed as dist

    if dist.get_backend(group) != "nccl":
        return torch.device("cpu")
    bound = bound_device(group)
    if bound is not None:
        return bound
    held = model_cuda_device(model)
    if held is not None:
        return held
    if guess and not torch.cuda.is_initialized() and torch.cuda.device_count() > 0:
        local = os.environ.get("LOCAL_RANK", "")
        index = int(local) if local.isdigit() else dist.get_rank()
        return torch.device("cuda", index % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def bound_device(group) -> torch.device | None:
    """The CUDA device ``init_process_group(device_id=...)`` bound the process group to (a subgroup inherits
    it), else ``None``: what torch's own ``barrier`` uses first, ahead of the current device."""
    import torch.distributed as dist

    try:
        bound = getattr(group if group is not None else dist.distributed_c10d._get_default_group(),
                        "bound_device_id", None)
    except Exception:  # noqa: BLE001 - no default group (a faked one), an older torch: none bound
        return None
    if isinstance(bound, torch.device) and bound.type == "cuda" and bound.index is not None:
        return bound
    return None


def built_device(group, model) -> torch.device:
    """Where the constructor's agreement (:func:`agree_built`) takes its tensors. Not NCCL: the CPU. NCCL: the
    bound device (:func:`bound_device`); else the one CUDA device holding ``model``'s parameters and buffers
    (:func:`model_cuda_device`); else, where CUDA is not initialized in this process yet (no ``set_device``, no
    CUDA tensor), device ``LOCAL_RANK`` (else the global rank) modulo the device count, much as torch's NCCL
    ``barrier`` guesses; else the current device (:func:`collective_device`'s rule, that guess added). Why: a lens is often built before
    ``torch.cuda.set_device(local_rank)`` (which ``measure`` needs); the current device is then ``cuda:0`` on
    every rank, and an NCCL collective there fails (two ranks on one GPU) or waits, and puts a CUDA context
    on GPU 0 for every rank, where before the constructor made no collective."""
    return _device(group, model, guess=True)


def model_cuda_device(model) -> torch.device | None:
    """The one CUDA device holding ``model``'s parameters and buffers, else ``None`` (a model on the CPU or the
    meta device, spread over several GPUs, or not an ``nn.Module``)."""
    if not isinstance(model, torch.nn.Module):
        return None
    try:
        found = {t.device for t in (*model.parameters(), *model.buffers()) if t.device.type == "cuda"}
    except Exception:  # noqa: BLE001 - a module whose tensors cannot be listed: no hint (this rank must still
        return None    # reach the agreement's collective, as every other rank does)
    return found.pop() if len(found) == 1 else None


@contextlib.contextmanager
def _own_collectives(error: BaseException | None, what: str):
    """Around an agreement's own collectives: where one fails (a rank left the others in a collective: the
    process-group timeout), no later agreement is tried (:func:`mark_out_of_step`), and this rank's own
    ``error``, if any, is what it raises (the collective's error stays attached as ``__context__``)."""
    try:
        yield
    except Exception as exc:
        mark_out_of_step(exc, what, failed=False)
        if error is None:
            raise
        raise mark_out_of_step(error, what, failed=False)  # noqa: B904 (the collective's error is the context)


def _held(two: bool):
    """Around an agreement's collectives where a second one may follow the first (``two``: the quoted causes of
    :func:`_causes`, on the failure path): a Ctrl-C on this rank is held until both ended
    (:func:`~spectral_lens._sync.deferred_interrupt`), then raised by :func:`_raise_held`. Why: Python raises the
    signal's ``KeyboardInterrupt`` as the first collective returns, so the rank left, and its peers, another rank
    having failed, waited in the second until the process-group timeout. One collective: nothing held (no handler
    replaced)."""
    if not two:
        return contextlib.nullcontext([])
    from ._sync import deferred_interrupt

    return deferred_interrupt()


def _raise_held(interrupted: list, error: BaseException | None) -> None:
    """The ``KeyboardInterrupt`` of a Ctrl-C :func:`_held` held, caused by this rank's own ``error`` if any (which
    the peers were told)."""
    if interrupted and not isinstance(error, KeyboardInterrupt):
        raise KeyboardInterrupt from error


def agree(group, error: BaseException | None, what: str, model=None) -> None:
    """Collective agreement on this rank's local work before the next collective phase.

    Every rank of the group all-reduces (MAX) one failure flag per rank (``error`` may be a
    ``KeyboardInterrupt``: a Ctrl-C that reached one rank stops every rank too). If any rank failed,
    every rank raises at once instead of leaving the others waiting in the next collective: a
    failed rank re-raises its own exception, the others a ``RuntimeError`` naming the failed
    rank(s), a :class:`NonFiniteError` when every failed rank's error is one (non-finite hidden states
    or gradients: every rank can then handle the measurement's failure alike). In a single process,
    ``error`` is simply raised. ``model``: the lens's, where its tensors go under NCCL (:func:`collective_device`).
    """
    if error is not None and out_of_step(error):  # another collective would only wait too
        raise error
    rank, world = ranks(group)
    if world > 1:
        import torch.distributed as dist

        flags = torch.zeros(world, dtype=torch.int64, device=collective_device(group, model))
        flags[rank] = 0 if error is None else 2 if isinstance(error, NonFiniteError) else 1
        with _own_collectives(error, what):
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
        if error is None:
            codes = flags.tolist()
            _raise_failed(group, [r for r, f in enumerate(codes) if f], what,
                          nonfinite=all(f in (0, 2) for f in codes))
    if error is not None:
        raise error


def _raise_failed(group, failed: list[int], what: str, nonfinite: bool = False,
                  causes: list[str] | None = None) -> None:
    """On a rank that did not fail: the ``RuntimeError`` naming the group ranks ``failed`` by their global
    ranks, when there are any (a :class:`NonFiniteError` with ``nonfinite``: each failed rank's error was one);
    ``causes``: each failed rank's error as text, in the order of ``failed``, quoted in the message."""
    if failed:
        failed = [global_rank(group, r) for r in failed]
        quoted = "" if causes is None else "".join(f" (global rank {r}: {c})" for r, c in zip(failed, causes))
        raise (NonFiniteError if nonfinite else RuntimeError)(
            f"SpectralLens: {what} failed on global rank(s) {failed}{quoted}; this rank stopped too so that "
            f"no rank waits in a collective. See the error raised on rank(s) {failed} for the cause"
        )


CAUSE_BYTES = 512  # of a failed rank's error text (type and message, UTF-8) carried to the other ranks


def _member_world(group) -> int:
    """The size of ``group`` where this rank is one of its members under an initialized ``torch.distributed``;
    else 1 (no process group, a rank outside ``group``, or a ``group`` that is not a process group: no agreement
    is possible there, and ``measure`` refuses the last two)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    try:
        if dist.get_rank(group) < 0:
            return 1
        return dist.get_world_size(group)
    except Exception:  # noqa: BLE001 - not a process group: left to measure's own check, as before
        return 1


def agree_built(group, error: BaseException | None, what: str, model=None) -> None:
    """:func:`agree` for a step that every rank of ``group`` takes once, outside any measurement (building a
    lens): one ``all_reduce(MAX)`` of a failure flag per rank; where some rank failed, a second one (on that
    path only) carries each failed rank's error as text (its first :data:`CAUSE_BYTES` bytes), which the other
    ranks quote in their ``RuntimeError`` naming the failed ranks (their own error may be far from the failed
    rank's in a merged log). A failed rank re-raises its own exception. In a single process, on a rank outside
    ``group`` or with a ``group`` that is not a process group, ``error`` is simply raised (no collective).
    Under NCCL its tensors are on :func:`built_device` (``model``: the lens's model, a hint at this rank's GPU).
    A Ctrl-C on this rank is held across both collectives and raised after them (:func:`_held`)."""
    world = _member_world(group)
    if world == 1 or (error is not None and out_of_step(error)):
        if error is not None:
            raise error
        return
    import torch.distributed as dist

    rank = dist.get_rank(group)
    dev = built_device(group, model)
    flags = torch.zeros(world, dtype=torch.int64, device=dev)
    flags[rank] = int(error is not None)
    with _held(True) as interrupted, _own_collectives(error, what):
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
        failed = [r for r, f in enumerate(flags.tolist()) if f]
        causes = _causes(group, failed, rank, world, error, dev)
    _raise_held(interrupted, error)
    if error is not None:
        raise error
    _raise_failed(group, failed, what, causes=causes)


def _causes(group, failed: list[int], rank: int, world: int, error: BaseException | None,
            device) -> list[str] | None:
    """Each failed group rank's error as text (its first :data:`CAUSE_BYTES` bytes, in the order of ``failed``),
    in one ``all_reduce(MAX)`` of a row per rank; ``None`` (no collective) where none failed. Called by every rank
    of ``group`` once the ranks agreed that ``failed`` did (the same list everywhere: the same collective)."""
    import torch.distributed as dist

    if not failed:
        return None
    text = torch.zeros(world, CAUSE_BYTES, dtype=torch.int32, device=device)
    if error is not None:
        mine = error_text(error).encode(errors="backslashreplace")[:CAUSE_BYTES]  # a lone surrogate: a path's byte
        text[rank, :len(mine)] = torch.tensor(list(mine), dtype=torch.int32)
    dist.all_reduce(text, op=dist.ReduceOp.MAX, group=group)
    rows = text.cpu().tolist()
    return [bytes(b for b in rows[r] if b).decode(errors="replace") for r in failed]


def error_text(error: BaseException) -> str:
    """``error`` as the other ranks quote it (its type and message); where its ``__str__`` raises (a user's
    exception class), its type and a note instead: this rank is between its peers' collectives here, and an
    error raised before the text's ``all_reduce`` left them waiting in it until the process-group timeout (so did
    a message that UTF-8 cannot encode, a path's undecodable byte as a lone surrogate: :func:`_causes` escapes it)."""
    try:
        return f"{type(error).__name__}: {error}"
    except Exception:  # noqa: BLE001 - any error of its __str__
        return f"{type(error).__name__}: (its message could not be read: its __str__ raised)"


@contextlib.contextmanager
def built_together(group, what: str, undo=None, model=None):
    """Around a step that every rank of ``group`` takes once, outside any measurement (a lens's constructor):
    its success or failure agreed on leaving (:func:`agree_built`), so that an error on one rank (a layer its
    model lacks, an argument only it computes wrongly) stops every rank there instead of leaving the others
    waiting in their first collective until the process-group timeout. ``undo()``: called where this rank's
    step succeeded but the agreement raises (another rank failed), so that it leaves nothing bound, as a
    step that failed here does. ``model``: a hint at this rank's GPU under NCCL (:func:`built_device`)."""
    try:
        yield
    except BaseException as exc:  # an interrupt too
        agree_built(group, exc, what, model)
        raise
    try:
        agree_built(group, None, what, model)
    except BaseException:
        if undo is not None:
            undo()
        raise


def agree_counts(group, count: int, error: BaseException | None, what: str, model=None) -> list[int]:
    """Every rank's ``count`` (a number >= 0 of batches or samples), indexed by group rank, in one
    ``all_reduce(MAX)``, with this rank's failure (``error``) agreed as in :func:`agree`: if any rank
    failed, a failed rank re-raises its own exception and the others a ``RuntimeError`` naming it (a
    :class:`NonFiniteError` when every failed rank's error is one). Used under FSDP, where the ranks
    compare their pools as they go (before each forward)."""
    return agree_round(group, count, 0, error, what, model)[0]


def agree_round(group, count: int, digest: int, error: BaseException | None, what: str,
                model=None, quote: bool = False) -> tuple[list[int], list[int]]:
    """:func:`agree_counts`, and every rank's ``digest`` (an integer in ``[0, 2**56)``: :func:`batch_digest`)
    in the same ``all_reduce(MAX)`` of ``2 * world`` integers. A failed rank's count slot is 0 and its digest
    slot holds :func:`agree`'s code (1, 2 for a :class:`NonFiniteError`), so the ranks that did not fail raise
    a ``NonFiniteError`` too when every failed rank's error was one, as :func:`agree`'s do: a callback then
    skips the measurement alike on every rank, none going on alone into the training's next collective.
    ``quote``: where some rank failed, a second ``all_reduce`` (on that path only, :func:`_causes`) carries each
    failed rank's error text, quoted in the others' error (their logs may be far apart: other hosts); a Ctrl-C on
    this rank is then held across both and raised after them (:func:`_held`)."""
    import torch.distributed as dist

    if error is not None and out_of_step(error):
        raise error
    rank, world = ranks(group)
    slots = torch.zeros(2 * world, dtype=torch.int64, device=collective_device(group, model))
    slots[rank] = 0 if error is not None else count + 1  # 0: failed (the other ranks' slots are 0 here)
    slots[world + rank] = digest if error is None else 2 if isinstance(error, NonFiniteError) else 1
    with _held(quote) as interrupted, _own_collectives(error, what):
        dist.all_reduce(slots, op=dist.ReduceOp.MAX, group=group)
        values = slots.tolist()
        failed = [r for r in range(world) if values[r] == 0]
        causes = _causes(group, failed, rank, world, error, slots.device) if quote else None
    _raise_held(interrupted, error)
    if error is not None:
        raise error
    counts = [c - 1 for c in values[:world]]
    _raise_failed(group, failed, what, nonfinite=all(values[world + r] == 2 for r in failed), causes=causes)
    return counts, values[world:]


def agree_settings(group, settings: dict[str, str], error: BaseException | None, what: str, model=None) -> None:
    """Before a measurement's first collective: this rank's failure (``error``: a bad argument, an unattached
    lens) agreed as in :func:`agree`, and the lens's ``settings`` (``{argument: value as text}``, what the ranks
    must share: an option set on one rank only would mix the ranks' rows silently, or send them into
    different collectives) compared, in one ``all_reduce(MAX)`` of ``2 * world`` integers (:func:`agree_round`).
    Settings that differ: a ``ValueError`` on every rank naming the argument, both values and the ranks
    (their text gathered once more, on this failure path only). A Ctrl-C on this rank is held across both
    collectives and raised after them (:func:`_held`; before, the rank left, and the others waited in the gathering
    until the process-group timeout)."""
    world = ranks(group)[1]
    if world == 1:
        if error is not None:
            raise error
        return
    text = "\n".join(f"{k}={v}" for k, v in sorted(settings.items()))
    digest = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "big")
    with _held(True) as interrupted:
        digests = agree_round(group, 0, digest, error, what, model)[1]
        if len(set(digests)) > 1:
            _refuse_other_settings(group, settings, world, model)
    _raise_held(interrupted, None)


def _refuse_other_settings(group, settings: dict[str, str], world: int, model=None) -> None:
    """:func:`agree_settings`'s ``ValueError`` where the ranks' settings digests differ (agreed: every rank is here),
    naming the settings that differ, each with its value on two of the ranks (gathered in one ``all_gather_object``)."""
    import torch.distributed as dist

    every: list = [None] * world
    dev = collective_device(group, model)  # all_gather_object takes no device: the current one, made this one
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        dist.all_gather_object(every, settings, group=group)  # every rank is here: the digests are agreed
    other = next(r for r in range(world) if every[r] != every[0])
    differ = [k for k in sorted(set(every[0]) | set(every[other])) if every[0].get(k) != every[other].get(k)]
    each = "; ".join(f"{k}={every[0].get(k)} on global rank {global_rank(group, 0)}, {k}={every[other].get(k)} on "
                     f"global rank {global_rank(group, other)}" for k in differ)
    raise ValueError(
        f"SpectralLens: the ranks' lenses are configured differently ({each}); every rank must build the lens with "
        "the same arguments: the ranks' rows are summed into one statistic per layer, and rank 0's gradient "
        "protocol is broadcast to the others"
    )


def callable_name(fn) -> str:
    """``fn``'s module and qualified name (the same in every rank's process for the same function), ``None``
    as ``None``: how :func:`agree_settings` compares a ``mask_fn`` or ``pick``. A ``functools.partial`` is named
    by its function, an instance of a class by its class; the script's module is ``__main__`` on every rank (a
    process started by ``multiprocessing``'s spawn, as ``mp.spawn`` starts them, runs it as ``__mp_main__``).
    Not compared: a lambda's or closure's code and captured values, a partial's arguments (two lambdas of one
    module have the same name)."""
    if fn is None:
        return "None"
    if isinstance(fn, functools.partial):  # (only a partial: another callable's own .func attribute is not it)
        fn = fn.func
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None) or type(fn).__module__
    return f"{'__main__' if module == '__mp_main__' else module}.{name}"


def batch_structure(batch) -> str:
    """The shapes and dtypes of ``batch``'s tensors in its nesting (mappings by key, sequences in order), and
    other values' types: what ranks running the same batch together (one tensor-parallel replica, a pipeline's
    stages) must agree on before its forward."""
    if isinstance(batch, torch.Tensor):
        return f"{str(batch.dtype).removeprefix('torch.')}{list(batch.shape)}"
    if isinstance(batch, dict) or (hasattr(batch, "keys") and hasattr(batch, "__getitem__")):
        return "{" + ", ".join(f"{k!r}: {batch_structure(batch[k])}" for k in sorted(batch.keys(), key=repr)) + "}"
    if isinstance(batch, (list, tuple)):
        return "(" + ", ".join(batch_structure(b) for b in batch) + ")"
    return type(batch).__name__


def batch_digest(batch) -> int:
    """A digest of :func:`batch_structure` in ``[1, 2**56)`` (0: no batch)."""
    return 1 + int.from_bytes(hashlib.blake2b(batch_structure(batch).encode(), digest_size=7).digest(), "big") % (2**56 - 1)


def out_of_step(error: BaseException) -> bool:
    """Whether ``error`` left the ranks' collectives out of step (:func:`mark_out_of_step`): no agreement is
    tried after it, since the other ranks may wait in a different collective."""
    return bool(getattr(error, _OUT_OF_STEP, False))


def mark_out_of_step(error: BaseException, what: str, failed: bool = True) -> BaseException:
    """``error``, marked as raised where the ranks' collectives may be out of step (inside a forward whose
    every pass is a collective: FSDP's all-gathers, tensor parallelism's all-reduces, a pipeline's sends and
    receives; or a collective that failed), with a note (``add_note``; a warning before Python 3.11) saying
    that the other ranks wait until the process-group timeout. ``failed``: this rank's own failure (else a
    collective's, most likely left waiting by another rank's failure). Marked once."""
    if out_of_step(error):
        return error
    try:
        setattr(error, _OUT_OF_STEP, True)
    except AttributeError:  # an exception type without attributes of its own: raised unmarked, as it is
        return error
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if failed:
        note = (f"SpectralLens: {what} failed on global rank {rank} inside a pass that is itself a collective over "
                "the ranks, so the lens cannot agree on it: if this rank failed first, the other ranks wait in that "
                "pass's collective until the process group's timeout; if a collective of the pass timed out here, "
                "another rank failed first (see its error). The timeout: " + TIMEOUT_ADVICE)
    else:
        note = (f"SpectralLens: a collective of {what} failed on global rank {rank}: another rank failed inside a "
                "pass whose collectives this rank waited in (see its error), or never reached this point (it did "
                "not call measure() at this step, is still in other work, or exited). The timeout: "
                + TIMEOUT_ADVICE)
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:  # Python 3.10
        warnings.warn(note, RuntimeWarning, stacklevel=2)
    return error


@contextlib.contextmanager
def collective_pass(what: str):
    """Around a forward (or forward and backward) that is a collective over the ranks: an exception from it
    is :func:`mark_out_of_step` and re-raised at once; the agreements after it raise it without a collective."""
    try:
        yield
    except BaseException as exc:  # an interrupt too
        raise mark_out_of_step(exc, what)


def global_rank(group, rank: int) -> int:
    """The global rank of group rank ``rank`` (``group=None``: the world, the same rank)."""
    import torch.distributed as dist

    return rank if group is None else dist.get_global_rank(group, rank)


def agree_widths(group, named: list, batches: int, model=None) -> None:
    """Check that every rank measures the same layers (``named``: this rank's ``(name, accumulator)``
    pairs, sorted by name, the order in which they are synced) and that every rank's pool gave the same
    number of batches (``batches``), in one ``all_reduce(MAX)`` of a fixed length; then give an
    accumulator that saw no rows on this rank (no batch of the pool) the width the other ranks saw,
    so that it joins ``sync`` with zero rows, in a second one. Each rank runs batch ``i`` for
    ``i % world == rank`` of its own pool, so pools of different lengths would measure a mix of
    batches silently, and other layers on one rank would be summed into this rank's layer (or, in a
    different number, leave the ranks in mismatched collectives)."""
    import torch.distributed as dist

    names = [name for name, _ in named]
    (most_layers, most_digest, most), (fewest_layers, fewest_digest, fewest) = _extremes(
        group, [len(names), _digest(names), batches], model)
    _refuse_other_layers(names, (most_layers, most_digest), (fewest_layers, fewest_digest))
    _refuse_other_lengths(fewest, most)
    accs = [acc for _, acc in named]
    widths = torch.tensor([-1 if a.dim is None else a.dim for a in accs], dtype=torch.int64,
                          device=collective_device(group, model))
    dist.all_reduce(widths, op=dist.ReduceOp.MAX, group=group)
    for acc, d in zip(accs, widths.tolist()):
        if d < 0:  # the same on every rank: no rank saw a row for this layer
            raise ValueError(
                f"SpectralLens: {acc._label()}: no rank saw any rows; the pool gave no batch, or the module "
                "never ran in the model's forward"
            )
        if acc.dim is None:
            acc.dim = d


def agree_before_pass(group, names: list[str] | None, batches: int, model=None) -> None:
    """``ValueError`` on every rank when the ranks measure different layers (``names``: this rank's, sorted;
    ``None`` on a pipeline stage, whose ranks measure the layers they hold) or their pools have different
    lengths (``batches``: this rank's ``len(pool)``; a pool without one is compared round by round), in one
    ``all_reduce(MAX)``: where every forward is a collective (FSDP, ZeRO-3, one tensor-parallel replica, a
    pipeline), before any forward. Pools of different lengths would leave a rank waiting in a forward the
    others never run, and other layers on one tensor-parallel rank would leave the ranks' comparison of their
    rows (one collective per layer) mismatched."""
    values = [0, 0] if names is None else [len(names), _digest(names)]
    (most_layers, most_digest, most), (fewest_layers, fewest_digest, fewest) = _extremes(group, values + [batches], model)
    _refuse_other_layers(names, (most_layers, most_digest), (fewest_layers, fewest_digest))
    _refuse_other_lengths(fewest, most)


def _digest(names: list[str]) -> int:
    return int.from_bytes(hashlib.blake2b("\n".join(names).encode(), digest_size=7).digest(), "big")


def _refuse_other_layers(names, most: tuple[int, int], fewest: tuple[int, int]) -> None:
    """``ValueError`` (on every rank: the extremes of the ranks' layer counts and name digests are the same
    there) when the ranks measure different layers."""
    if most != fewest:
        raise ValueError(
            f"SpectralLens: the ranks measure different layers (this rank: {names}); every rank must build "
            "the lens with the same layers= on the same model"
        )


def _extremes(group, values: list[int], model=None) -> tuple[list[int], list[int]]:
    """The largest and the smallest of each of ``values`` over the ranks, in one ``all_reduce(MAX)``."""
    import torch.distributed as dist

    local = torch.tensor(values, dtype=torch.int64, device=collective_device(group, model))
    both = torch.cat([local, -local])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    n = len(values)
    return both[:n].tolist(), [-v for v in both[n:].tolist()]


def _refuse_other_lengths(fewest: int, most: int) -> None:
    """``ValueError`` (on every rank: the extremes are the same there) when the pools' lengths differ."""
    if most != fewest:
        raise ValueError(
            f"SpectralLens: the ranks' pools gave different numbers of batches ({fewest} to {most}); every "
            "rank must iterate the same whole pool (each rank forwards its share: batch i on rank i % world)"
        )


def refuse_other_counts(group, counts: list[int], full: int) -> None:
    """``ValueError`` (on every rank: ``counts`` are agreed) when the ranks' pools, compared round by round
    under FSDP, gave different numbers of batches; ``counts``: each group rank's
    batches so far, ``full``: the count of a rank whose pool filled this round (it may have more)."""
    if len(set(counts)) > 1:
        each = ", ".join(f"global rank {global_rank(group, r)}: {c}{' or more' if c == full else ''}"
                         for r, c in enumerate(counts))
        raise ValueError(
            f"SpectralLens: the ranks' pools gave different numbers of batches ({each}); every rank must iterate "
            "the same whole pool (each rank forwards its share: batch i on rank i % world). Under FSDP (and in one "
            "tensor-parallel replica) the pools are compared round by round, before each round's forwards"
        )


def from_rank0(group, value, model=None):
    """``value`` as rank 0 of ``group`` has it, on every rank (one small broadcast of a picklable
    object; none in a single process), under NCCL on :func:`collective_device` (else torch's current device)."""
    if ranks(group)[1] > 1:
        import torch.distributed as dist

        shared = [value]
        src = 0 if group is None else dist.get_global_rank(group, 0)  # src is a global rank
        dev = collective_device(group, model)
        dist.broadcast_object_list(shared, src=src, group=group, **({"device": dev} if dev.type == "cuda" else {}))
        value = shared[0]
    return value


def peers_any(model, group, flags: tuple[bool, ...]) -> tuple[bool, ...]:
    """``flags`` (each the same on every rank of ``group``, e.g. :func:`from_rank0`'s), each or-ed over this rank's
    tensor-parallel mesh peers where ``group`` holds one rank of each mesh (a data-parallel group, each rank's own
    group: :func:`~spectral_lens._tensor_parallel.one_replica`), whose ``group`` agreements do not reach the peers:
    a decision whether to measure (a measurement runs collectives of the mesh) is then the same on every rank of
    every mesh. One ``all_reduce`` (MAX) over the peers' group; none for a model without tensor parallelism, one
    replica (the group is the mesh) or a lens without a model, nor outside ``torch.distributed``."""
    return tuple(bool(v) for v in peers_max(model, group, tuple(int(bool(f)) for f in flags)))


def peers_max(model, group, values: tuple[int, ...]) -> tuple[int, ...]:
    """:func:`peers_any` for integers: each of ``values`` maxed over this rank's tensor-parallel mesh peers where
    ``group`` holds one rank of each mesh (e.g. ``1 +`` the global rank that failed, 0 for none: the peers can name
    it); ``values`` unchanged, with no collective, otherwise."""
    if model is None:
        return tuple(values)
    from ._tensor_parallel import one_replica

    try:
        tp = one_replica(model, group)
    except ValueError:  # a group mixing a mesh's ranks with others: refused by the lens (when built, and measure)
        return tuple(values)
    if tp is None or tp[0]:
        return tuple(values)
    import torch.distributed as dist

    both = torch.tensor([int(v) for v in values], dtype=torch.int64, device=collective_device(tp[1], model))
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=tp[1])
    return tuple(int(v) for v in both.tolist())
