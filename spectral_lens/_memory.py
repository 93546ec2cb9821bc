"""What the activation measurement's accumulators allocate on the rows' device, and the refusal of a pass
that cannot fit there (:func:`check_rows`, called by an attach's hooks at each layer's first rows:
:func:`check_fits` at the pass's first rows, for the layers on their device; again at the first rows on each
other device, and where a layer's width, device or rows per update are not the ones counted). Each layer is
counted on its own device (:func:`layer_device`, else the pass's first rows').

Derived from the code (``accumulate``, ``_chunk_sums``, ``_lower_s``, ``_compute``) and checked
against the real allocations in ``tests/core/test_measurement_memory.py``. Per accumulator of width
``d`` (``B = 8 d^2``, one float64 d x d matrix):

* held between updates: ``B`` (``S``, which updates add into in place; from the first update on) and a
  few float64 d-vectors (``m``, the shift, re-shift scratch; on the CPU the ``(2, 32, d)`` deferred
  re-shift terms);
* on top of that, at most one of these at a time (hooks run one after the other, ``compute`` solves
  one layer after the other):

  - an update of ``r`` rows: the centred rows ``r x d`` in the product dtype (fp32; bf16 for
    ``"fast"`` on CUDA; float64 for ``"float64"`` or float64 rows) and the chunk's ``d x d`` product
    (fp32, float64 for float64 products; on CUDA from d = 1024 three of them while the block form is
    concatenated; two on the CPU's ``syrk`` path from 8192 rows); a call of more than ``max_chunk_rows``
    rows (chunks of that many) holds two chunk products and its float64 ``d x d`` sum; bf16/fp16 CPU rows
    in ``"float64"`` precision also an fp32 copy of the shift's sample (up to 3,072 x d); a masked CPU update
    instead its compacted path's copies: rows of another dtype than the centred rows' gathered in their own
    (``r x d``; a call of several chunks: each chunk's valid rows), from 3,072 rows the valid sample rows
    copied out (up to 1,024 x d, NumPy), and cast to fp32 where the centred rows are float64 and the rows
    are not;
  - ``compute``: ``2 B`` (``S`` is mirrored in place, with a strict triangle's temporary; then the
    covariance and its ``m m^T``, or the covariance and the solve's copy of its input).

Not counted: the first update after ``S`` was handed out (``state_dict``, ``merge``, ``covariance`` or
``compute``; ``compute_async`` on CUDA) writes into a new ``d x d`` buffer rather than into the one
read (copy-on-write), one ``B`` more during that update only; a measurement pass reads ``S`` after its
last update. A masked CPU update's row indices (NumPy int64, a few per row) and, where no valid row is in
the chunk's sample, the sample of the valid rows instead (up to 3,071 rows, not 1,024).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Sequence

import torch
from torch import nn

from ._chunk_sums import _SHIFT_ROWS  # rows of the shift sample of a CPU chunk of at least 3 x that
from ._lower_s import _PENDING  # deferred rank-2 re-shift terms of CPU updates
from .spectra.moments import PRECISIONS, SYRK_MIN_ROWS


_HALF = (torch.bfloat16, torch.float16)


def _product_bytes(precision: str, device_type: str, rows_float64: bool) -> tuple[int, int]:
    """Bytes per entry of the centred rows and of the chunk's product: ``(row, product)``."""
    if precision == "float64" or rows_float64:
        return 8, 8
    if precision == "fast" and device_type == "cuda":
        return 2, 4  # bf16 rows, fp32 accumulation
    return 4, 4


def accumulator_bytes(d: int, precision: str, rows: int, *, device_type: str = "cuda", rows_float64: bool = False,
                      max_chunk_rows: int = 131072, rows_half: bool = False, masked: bool = False) -> tuple[int, int, int]:
    """``(held, update, solve)`` bytes of one accumulator of width ``d``: what it holds between updates
    (from its first update on), and what an update of ``rows`` rows and its ``compute`` allocate on
    top of that at their peak (a few d-vectors less: within ``64 d`` bytes). ``rows_float64``/``rows_half``:
    the rows are float64 / bf16 or fp16; ``masked``: the update has a mask (counted as if some row is masked:
    on the CPU the compacted path's copies). See the module's docstring."""
    if precision not in PRECISIONS:
        raise ValueError(f"accumulator_bytes: precision must be one of {PRECISIONS}, got {precision!r}")
    if d < 1 or rows < 0:
        raise ValueError(f"accumulator_bytes: need d >= 1 and rows >= 0, got d={d}, rows={rows}")
    square = 8 * d * d
    row_b, prod_b = _product_bytes(precision, device_type, rows_float64)
    if device_type == "cpu" and rows <= max_chunk_rows:  # m, shift; the deferred re-shift terms (a NumPy array)
        held = square + 8 * d * (2 + 2 * _PENDING)
    else:  # m, shift, the (3, d) re-shift scratch (CUDA; CPU calls of several chunks)
        held = square + 8 * d * 5
    chunk = min(rows, max_chunk_rows)
    if rows > max_chunk_rows:  # several chunks: the call's float64 sum, the previous chunk's and this one's product
        products, extra = 2, square
    elif device_type == "cpu" and chunk >= SYRK_MIN_ROWS:
        products, extra = 2, 0  # the recycled product buffer and syrk's own result
    else:
        products, extra = 1, 0
    if device_type == "cuda" and prod_b == 4 and precision != "fast" and d >= 1024:
        products += 2  # symmetric_product's block form: the blocks, the two block rows, the result
    update = chunk * d * row_b + products * d * d * prod_b + extra
    sample = chunk if chunk < 3 * _SHIFT_ROWS else _SHIFT_ROWS  # rows of the shift's sample
    half_copy = 0
    if device_type == "cpu" and rows_half and precision == "float64" and rows <= max_chunk_rows:
        # half rows, converted to float64 in the scratch: their shift sample (every row below 3,072, else 16 runs of
        # 64) is read again as fp32 values (the shift of fp32 rows), a copy
        half_copy = sample * d * 4
    masked_copies = 0
    if device_type == "cpu" and masked:
        in_b = 8 if rows_float64 else 2 if rows_half else 4  # bytes per entry of the rows as given
        if rows > max_chunk_rows:  # _call_sums: each chunk's valid rows, gathered (index_select) before its product
            masked_copies = chunk * d * in_b
        else:  # _cpu_compacted: rows of another dtype than the scratch's gathered in theirs first (a recycled
            # buffer of the whole chunk), the valid sample rows copied out of the scratch (NumPy, from 3,072 rows),
            # and cast to fp32 where the scratch is float64 and the rows are not (the shift of fp32 rows)
            masked_copies = (chunk * d * in_b if in_b != row_b else 0) + (sample * d * row_b if chunk >= 3 * _SHIFT_ROWS else 0)
            masked_copies += sample * d * 4 if row_b == 8 and not rows_float64 else 0
    update += max(half_copy, masked_copies)  # one path or the other: an update's rows all valid take the first
    if device_type == "cpu" and chunk >= 3 * 1024:  # the shift sample's per-run column sums: 16 d-vectors
        update += 16 * d * (8 if rows_float64 or (precision == "float64" and rows > max_chunk_rows) else 4)
    return held, update, 2 * square


def measurement_bytes(dims: Sequence[int], precision: str, rows: int, *, device_type: str = "cuda",
                      rows_float64: bool = False, max_chunk_rows: int = 131072) -> int:
    """Peak bytes that accumulators of widths ``dims`` measured in one pass allocate on the rows' device
    (``device_type``), with ``rows`` rows per update: every one's held bytes plus the largest update or
    solve on top (:func:`accumulator_bytes`; hooks update, and ``compute`` solves, one layer at a time)."""
    sizes = [accumulator_bytes(int(d), precision, rows, device_type=device_type, rows_float64=rows_float64,
                               max_chunk_rows=max_chunk_rows) for d in dims]
    return _peak(sizes)


def _peak(sizes: list[tuple[int, int, int]]) -> int:
    return sum(h for h, _, _ in sizes) + max((max(u, c) for _, u, c in sizes), default=0)


def free_bytes(device: torch.device) -> int | None:
    """Bytes the measurement can still allocate on ``device``: on CUDA the driver's free memory plus what
    PyTorch's caching allocator has reserved and not handed out; on the CPU the kernel's ``MemAvailable``
    plus ``SwapFree`` (``/proc/meminfo``; else ``os.sysconf``'s available pages), and no more than a cgroup
    memory limit leaves (a container's: ``/proc/meminfo`` shows the host's memory). ``None`` where it
    cannot be told (other devices, or a failed read: no check)."""
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            return int(free) + int(torch.cuda.memory_reserved(device)) - int(torch.cuda.memory_allocated(device))
        except (RuntimeError, AssertionError, OSError):  # a driver that cannot say: no check (the forward goes on)
            return None
    if device.type != "cpu":
        return None
    host = _meminfo()
    if host is None:
        try:
            host = int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, AttributeError):
            host = None
    limited = _cgroup_free()
    if host is None or limited is None:
        return limited if host is None else host
    return min(host, limited)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def _meminfo() -> int | None:
    """``MemAvailable`` plus ``SwapFree`` from ``/proc/meminfo``, in bytes (what the host can still hand out
    before the OOM killer); ``None`` without ``MemAvailable``."""
    fields = {}
    for line in (_read("/proc/meminfo") or "").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("MemAvailable:", "SwapFree:") and parts[1].isdigit():
            fields[parts[0]] = int(parts[1]) * 1024
    if "MemAvailable:" not in fields:
        return None
    return fields["MemAvailable:"] + fields.get("SwapFree:", 0)


_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as 2^63 rounded down to a page


def _cgroup_free() -> int | None:
    """What the memory limits of this process's cgroup and its ancestors leave: per limited cgroup, its limit
    less its usage plus its inactive file cache (reclaimable), the smallest of them; ``None`` without a
    limit. cgroup v2 (``memory.max``) and v1 (``memory.limit_in_bytes``), from ``/proc/self/cgroup``'s paths
    and, for a container's own view, the mount's root."""
    found = []
    for line in (_read("/proc/self/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            root, files = "/sys/fs/cgroup", ("memory.max", "memory.current", "inactive_file")
        elif "memory" in parts[1].split(","):
            root, files = "/sys/fs/cgroup/memory", ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                                    "total_inactive_file")
        else:
            continue
        path = parts[2].strip().strip("/")
        dirs = {root}
        while path:
            dirs.add(f"{root}/{path}")
            path = path.rpartition("/")[0]
        for d in sorted(dirs):
            free = _cgroup_dir_free(d, *files)
            if free is not None:
                found.append(free)
    return min(found) if found else None


def _cgroup_dir_free(d: str, limit_file: str, usage_file: str, inactive_key: str) -> int | None:
    limit, usage = (_read(f"{d}/{limit_file}") or "").strip(), (_read(f"{d}/{usage_file}") or "").strip()
    if not (limit.isdigit() and usage.isdigit()) or int(limit) >= _UNLIMITED:
        return None  # no such cgroup here, or "max": no limit
    inactive = 0
    for line in (_read(f"{d}/memory.stat") or "").splitlines():
        key, _, value = line.partition(" ")
        if key == inactive_key and value.strip().isdigit():
            inactive = int(value)
    return max(0, int(limit) - int(usage) + inactive)


def _gib(n: int) -> str:
    """``n`` bytes in GiB; below 1 GiB also in MiB (a small pass's "0.00 GiB" said nothing)."""
    return f"{n / 2**30:.2f} GiB" + (f" ({n / 2**20:.1f} MiB)" if n < 2**30 else "")


CHECK_VARIABLE = "SPECTRAL_LENS_MEMORY_CHECK"


def check_enabled() -> bool:
    """Whether the check runs: the environment variable ``SPECTRAL_LENS_MEMORY_CHECK`` unset, empty or ``1``;
    ``0`` turns it off (the way around a refusal the user knows to be wrong: an estimate or a free-memory read
    that does not hold for their setup). Any other value is a ``ValueError``: a typo must neither keep nor drop
    the check silently."""
    value = os.environ.get(CHECK_VARIABLE, "").strip()
    if value in ("", "1"):
        return True
    if value == "0":
        return False
    raise ValueError(f"spectral_lens: the environment variable {CHECK_VARIABLE}={value!r} must be 0 (no memory check "
                     "of the activation measurement) or 1 (the check, as when it is unset)")


# torch layers whose whole output (no pick=) has a width their attributes give before it is computed; read only where
# the forward is torch's own (a subclass's forward, a quantized linear layer's, may return anything)
_KNOWN_WIDTHS = ((nn.Linear, "out_features"), (nn.Bilinear, "out_features"), (nn.Embedding, "embedding_dim"),
                 (nn.EmbeddingBag, "embedding_dim"), (nn.LayerNorm, "normalized_shape"),
                 *(((nn.RMSNorm, "normalized_shape"),) if hasattr(nn, "RMSNorm") else ()))


def output_width(module: nn.Module, pick) -> int | None:
    """The width ``d`` of the rows an attach's hook on ``module`` feeds, where it is certain before they arrive:
    the output itself (``pick=None``) of a torch layer computed by torch's own forward (``nn.Linear``,
    ``nn.Bilinear``: ``out_features``; ``nn.Embedding``, ``nn.EmbeddingBag``: ``embedding_dim``;
    ``nn.LayerNorm``, ``nn.RMSNorm``: the last of ``normalized_shape``). ``None`` otherwise: a ``pick=`` (it
    can choose any tensor), a block, a subclass with a forward of its own. (A forward hook registered before
    the attach's that returns another output is caught at the layer's first rows: :func:`check_rows`.)"""
    if pick is not None:
        return None
    for cls, attr in _KNOWN_WIDTHS:
        if isinstance(module, cls) and type(module).forward is cls.forward:
            width = getattr(module, attr, None)
            if isinstance(width, (tuple, list)):
                width = width[-1] if width else None
            return width if isinstance(width, int) and not isinstance(width, bool) and width > 0 else None
    return None


def layer_device(module: nn.Module) -> torch.device | None:
    """The device an attach's hook on ``module`` gets its rows on, where the module says so before they arrive: the
    ``execution_device`` of its Accelerate hook (a ``device_map`` across devices, ``dispatch_model``), else the one
    accelerator all its parameters and buffers are on (a pipeline stage, a block moved by hand); read at the pass's
    first rows (:func:`check_rows`), so a model moved after the attach is counted where it runs. ``None`` otherwise
    (and for an accelerator named without its index, ``execution_device="cuda"``, which no tensor's device equals):
    the layer is counted on the pass's first rows' device until its own rows arrive (:func:`check_rows`). So are
    layers without weights, with weights on several devices, on ``meta``, or on the CPU (weights kept there between
    forwards may run on an accelerator: FSDP's CPU offload; counted on the CPU, their rows' memory on the accelerator
    would be missed at the pass's first check)."""
    from ._offload import execution_device

    found = execution_device(module)
    if found is None:
        devices = {t.device for t in (*module.parameters(), *module.buffers())}
        found = devices.pop() if len(devices) == 1 and next(iter(devices)).type not in ("meta", "cpu") else None
    # an accelerator named without its index ("cuda": the current one when the rows are sent) is not a tensor's
    # device (cuda:0): such a layer is counted on its rows' device, as one not known before them
    return None if found is not None and found.index is None and found.type not in ("cpu", "meta") else found


# the passes that passed their check: capture -> (checked devices, {accumulator: (device, width, rows, sizes)}): each
# layer's device (its rows' device once they came, else layer_device's, else the pass's first rows'), the width and
# rows per update counted for it and their accumulator_bytes. A device is checked at the first rows that arrive on it
# (check_fits: the pass's first rows; check_rows: a later device's). While the capture is active, its layers on a
# checked device that hold no state yet are memory that is free now but that their first rows will take (_claimed);
# check_rows compares a layer's real device, width and rows with the ones counted. Weak keys: a dropped capture claims
# nothing.
_PASSES: weakref.WeakKeyDictionary[object, tuple[set, dict]] = weakref.WeakKeyDictionary()
_PASSES_LOCK = threading.Lock()  # hooks may run from several threads (nn.DataParallel's replicas)


def _claimed(owner, device: torch.device) -> list[tuple[int, int, int]]:
    """Sizes of the layers that other active captures' checks counted on ``device`` and that hold no state yet.
    Layers with state are out of the free memory already (:func:`free_bytes`), so they are not counted again."""
    with _PASSES_LOCK:
        passes = [(capture, set(checked), list(layers.items())) for capture, (checked, layers) in _PASSES.items()]
    return [sizes for capture, checked, layers in passes
            if capture is not owner and getattr(capture, "active", False) and device in checked
            for acc, (dev, _, _, sizes) in layers if dev == device and not acc.initialized]


def on_device(layers: dict, device: torch.device) -> dict:
    """The entries ``{accumulator: (device, width, rows, sizes)}`` of ``layers`` counted on ``device``."""
    return {acc: entry for acc, entry in layers.items() if entry[0] == device}


def _well_formed(rows) -> bool:
    return (isinstance(rows, torch.Tensor) and not rows.is_nested and rows.layout == torch.strided
            and rows.ndim >= 1 and rows.shape[-1] != 0)  # (update reports malformed rows itself)


def _span(dims: Sequence[int]) -> str:
    return f"d={dims[0]}" if len(set(dims)) == 1 else f"widths d={min(dims)}..{max(dims)}"


_WAY_AROUND = (f"If you know it fits (the estimate or the free memory read does not hold for your setup), set the "
               f"environment variable {CHECK_VARIABLE}=0 to turn this check off. See docs/performance.md, "
               "'Memory of the activation measurement'")


def check_rows(capture, acc, rows: torch.Tensor) -> None:
    """The check of an attach's hook at the first rows of ``acc``, a layer of ``capture`` (an
    :class:`~spectral_lens.activation_capture.ActivationCapture`) that holds no state yet. At the pass's first
    rows (no layer of ``capture`` holds state): :func:`check_fits` for all its layers, before any state exists (those
    on the rows' device are checked; see :func:`layer_device`). Later, where this layer is not as that check counted
    it (rows on a device not checked yet: that device's first rows, checked for every layer counted there; on
    another device than the one counted; a width not known before its rows, or output changed by another hook; more
    rows per update than counted: an MoE layer fed top-k x tokens, a module called twice per forward): the check
    again, of what is still to come on the rows' device (this capture's layers without state counted there, other
    captures' claimed ones) against what is free there now, before this layer's state exists. Rows of which there
    are none (an MoE expert no token was routed to) make no state: nothing is checked until real rows come (not
    once per forward, nor counted at an update of no rows)."""
    if isinstance(rows, torch.Tensor) and not rows.is_nested and rows.numel() == 0 or not check_enabled():
        return
    accs = capture.accumulators
    if not any(a.initialized for a in accs.values()):
        widths, modules = capture._widths, getattr(capture, "_modules", {})
        # the layers' devices now, not at the attach: a model moved since (model.to) is counted where it is
        # (a capture built without its modules, or a module dropped since: counted on the rows' device)
        devices = []  # (a loop: Dynamo, intercepting this frame after a compiled model's transform, ran a walrus in a
        for name in accs:  # comprehension's weakref call as a call of the module; test_review19_memory)
            module = modules[name]() if name in modules else None
            devices.append(None if module is None else layer_device(module))
        check_fits(list(accs.values()), rows, [widths.get(name) for name in accs], owner=capture, first=acc,
                   devices=devices, masked=getattr(capture, "_mask", None) is not None)
        return
    if not _well_formed(rows):
        return
    width, device = int(rows.shape[-1]), rows.device
    n_rows = rows.numel() // width
    if acc.dim is not None and acc.dim != width:
        return  # update refuses these rows, naming both widths
    with _PASSES_LOCK:
        entry = _PASSES.get(capture)
        if entry is None:
            return  # a pass not checked (free memory unknown, the check off)
        checked, layers = entry
        counted = layers.get(acc)
        new_device = device not in checked
        if not new_device and counted is not None and counted[:2] == (device, width) and counted[2] >= n_rows:
            return  # as counted
        mine = dict(layers)

    def size(a, d, dev, n):
        return dev, d, n, accumulator_bytes(d, a.precision, n, device_type=dev.type, rows_float64=rows.dtype == torch.float64,
                                            rows_half=rows.dtype in _HALF, max_chunk_rows=a.max_chunk_rows,
                                            masked=getattr(capture, "_mask", None) is not None)

    sampled = counted is not None and counted[1] is None  # the first layer of a width not known: the others like it
    if sampled:
        mine.update({a: size(a, width, dev, n) for a, (dev, w, n, _) in mine.items() if w is None})
    mine[acc] = size(acc, width, device, n_rows)
    here = on_device(mine, device)
    sizes = [(0 if a.initialized else h, u, c) for a, (_, _, _, (h, u, c)) in here.items()]  # held: out of free
    others = _claimed(capture, device)
    need = _peak(sizes + others)
    free = free_bytes(device)
    if free is None or need <= free:
        with _PASSES_LOCK:
            if _PASSES.get(capture) is entry:
                layers.update(mine)
                checked.add(device)
        return
    waiting = [w for a, (_, w, _, _) in here.items() if not a.initialized]  # (None: a width not known, not counted)
    held = sum(a.initialized for a in mine)
    name = acc.name or "ActivationCovarianceAccumulator"
    before = ("not counted by" if counted is None else
              f"counted on {counted[0]}, not on {device}, by" if counted[0] != device else
              "not counted yet (its width was not known before its rows) by" if sampled else
              f"counted at d={counted[1]} by" if counted[1] != width else
              f"counted at {counted[2]} rows per update by")
    first_here = (f"; they are the first rows on {device}, where {len(here)} of its layers are counted"
                  if new_device else "")
    there = " there" if len(here) < len(mine) else ""
    like = (f"; the layers of widths not known before their rows that are still to come are counted at its d={width}"
            if sampled else "")
    theirs = (f"; {len(others)} layer(s) of other captures without state yet are counted too "
              f"({_gib(sum(h for h, _, _ in others))})" if others else "")
    raise MemoryError(
        f"spectral_lens: layer {name!r} got its first rows, of width d={width} ({n_rows} rows per update), after "
        f"{held} of its capture's {len(mine)} layers got theirs; it was {before} the pass's first check{first_here}"
        f"{like}. The {len(waiting)} layer(s) of this capture without state yet{there} "
        f"({_span([w for w in waiting if w])}) need about {_gib(need)} on {device} with one layer's update or solve "
        f"on top{theirs}, but only {_gib(free)} is free there. "
        f"{name!r} and the layers after it got no rows from this forward; the {held} layer(s) with state keep "
        "theirs (reset() the capture, or remove and drop it, to free them; a SpectralLens drops its own). Measure "
        "layers of different widths in separate passes (one sl.attach or SpectralLens per width, or give dim=), or "
        f"fewer layers at once, or free memory on that device first. {_WAY_AROUND}"
    )


def check_fits(accumulators: Sequence, rows: torch.Tensor, widths: Sequence | None = None, *, owner=None,
               first=None, devices: Sequence | None = None, masked: bool = False) -> None:
    """Raise ``MemoryError`` when the ``accumulators`` of one capture, at the pass's first rows (``rows``, of
    ``first``, by default the first accumulator), would need more memory on the rows' device than is free
    (:func:`free_bytes`): before their state exists, not an out-of-memory error later in the pass or in the
    training step after it. Each layer is counted at its ``dim``, else at ``widths[i]`` (:func:`output_width`),
    else, where the rows are of a layer of a width not known before them, at the rows' width (assumed); where
    they are of a layer of known width, not yet: :func:`check_rows` checks again at a layer's first rows when
    its width is not the one counted. The layers of other active captures that passed this check on that
    device and hold no state yet are counted too (free now, taken at their first rows). With ``owner`` (the
    capture) a pass that fits is recorded for :func:`check_rows` and for the other captures' checks. With
    ``devices`` (:func:`layer_device` per accumulator; ``None``: not known, the rows' device), only the layers on the
    rows' device are checked now; those on other devices are recorded there, and checked at the first rows on their
    device (:func:`check_rows`). The message names the layers, widths, precision, bytes needed and free, and the
    remedies."""
    if not accumulators or not check_enabled() or not _well_formed(rows):
        return
    device = rows.device
    free = free_bytes(device)
    if free is None:
        return
    width = int(rows.shape[-1])
    n_rows = rows.numel() // width
    first = accumulators[0] if first is None else first
    known = [acc.dim or (widths[i] if widths is not None else None) for i, acc in enumerate(accumulators)]
    at = next(i for i, acc in enumerate(accumulators) if acc is first)
    devs = [device if i == at or devices is None or devices[i] is None else torch.device(devices[i])
            for i in range(len(accumulators))]
    # widths not known before the rows: counted at the first rows' width when those rows are of such a layer (the
    # common case: blocks, all of one width); else not yet, but at the first rows of the first of them (check_rows)
    sample = width if known[at] is None else None
    dims = [width if i == at and d is None else d if d is not None else sample for i, d in enumerate(known)]
    sizes = [(0, 0, 0) if d is None else
             accumulator_bytes(d, acc.precision, n_rows, device_type=dev.type, rows_float64=rows.dtype == torch.float64,
                               rows_half=rows.dtype in _HALF, max_chunk_rows=acc.max_chunk_rows, masked=masked)
             for d, acc, dev in zip(dims, accumulators, devs)]
    here = [i for i, dev in enumerate(devs) if dev == device]  # checked now; the others at their device's first rows
    unknown = sum(known[i] is None for i in here if i != at)
    others = _claimed(owner, device)
    need = _peak([sizes[i] for i in here] + others)
    if need <= free:
        if owner is not None:
            with _PASSES_LOCK:
                _PASSES[owner] = ({device}, dict(zip(accumulators, zip(devs, dims, [n_rows] * len(dims), sizes))))
        return
    if owner is not None:
        with _PASSES_LOCK:
            _PASSES.pop(owner, None)
    elsewhere = len(accumulators) - len(here)
    accumulators, dims, sizes = [accumulators[i] for i in here], [dims[i] for i in here], [sizes[i] for i in here]
    k = len(accumulators)
    precisions = sorted({acc.precision for acc in accumulators})
    precision = repr(precisions[0]) if len(precisions) == 1 else repr(precisions)
    counted = [(d, size) for d, size in zip(dims, sizes) if d is not None]
    fit = next((n for n in range(len(counted) - 1, 0, -1) if _peak([c for _, c in counted[:n]] + others) <= free),
               0)  # the first n layers that fit
    if fit == 0 and others and _peak([counted[0][1]]) <= free:  # fits alone: other captures' layers take the memory
        fewer = ("The layers of the other capture(s) take that memory: measure these after they are removed (in "
                 "another pass), or together with them in one capture, or free memory on that device first")
    elif fit == 0:  # not even one: the rows of one update, or one layer's sums, are too many
        held, update, solve = counted[0][1]
        if update > solve:  # the rows: fewer per forward
            fewer = (f"Even one layer does not fit (its sums and the update of {n_rows} rows need "
                     f"{_gib(held + update)}): feed fewer rows per forward (a smaller batch"
                     + (", or a smaller max_chunk_rows" if n_rows > min(acc.max_chunk_rows for acc in accumulators)
                        else "") + "), or free memory on that device first")
        else:
            fewer = (f"Even one layer of width d={counted[0][0]} does not fit (its sums and their solve need "
                     f"{_gib(held + solve)}): measure a narrower layer, or free memory on that device "
                     "first")
    else:
        fewer = (f"Measure fewer layers at once (about {fit} fit): e.g. every 4th block, SpectralLens(model, pool, "
                 "layers=all_blocks(model)[::4]) (from spectral_lens.lens import all_blocks), or the blocks in "
                 "groups over several passes (one lens per group, layers=blocks[i:i + n], or one "
                 "sl.attach(model, blocks[i:i + n]) per group); or free memory on that device first")
    guessed = "" if not unknown else (
        f" The width of {unknown} of them is not known before their rows arrive (no dim=; a pick=, a block, or a "
        f"module whose output width is not its own attribute) and was taken as the first rows' d={width}: if they are "
        "narrower, measure them in a capture of their own (one capture per width)." if sample is not None else
        f" {unknown} of them, of widths not known before their rows arrive, are not counted yet (they are at the "
        "first rows of the first of them).")
    theirs = (f"; {len(others)} layer(s) of other captures on that device that hold no state yet are counted too "
              f"({_gib(sum(h for h, _, _ in others))})" if others else "")
    apart = (f" ({elsewhere} more of the capture's layers are on other devices, checked at their first rows there)"
             if elsewhere else "")
    raise MemoryError(
        f"spectral_lens: measuring {k} layer(s){apart} ({_span([d for d, _ in counted])}, precision={precision}, "
        f"{n_rows} rows per update) in one pass needs about {_gib(need)} on {device} (each layer keeps a "
        f"float64 d x d sum, 8 d^2 bytes, plus one layer's update or solve on top{theirs}), but only {_gib(free)} "
        f"is free there; nothing was measured.{guessed} {fewer}. {_WAY_AROUND}"
    )
