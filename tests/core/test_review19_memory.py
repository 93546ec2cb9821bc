"""Review of the activation measurement's memory check (``spectral_lens._memory``: the free memory read on
the CPU in a container or with swap, a failing read, the refusal's layer count) and of the torch 2.4
compatibility fixes of the capture (a compiled graph traced outside a ``torch.func`` transform and run
inside one, and the reverse)."""

from __future__ import annotations

import builtins
import re

import pytest
import torch
from torch import nn

import spectral_lens as sl
from spectral_lens import _memory
from spectral_lens.accumulate import ActivationCovarianceAccumulator

GiB = 1 << 30


def _fake_files(monkeypatch, tmp_path, files: dict[str, str]) -> None:
    """Serve ``files`` (absolute path -> text) to ``_memory``'s reads; every other /proc or /sys path is
    absent, so the machine running the test does not matter."""
    real_open = builtins.open

    def fake_open(path, *args, **kwargs):
        path = str(path)
        if path in files:
            target = tmp_path / f"f{sorted(files).index(path)}"
            target.write_text(files[path])
            return real_open(target, *args, **kwargs)
        if path.startswith(("/proc/", "/sys/")):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(_memory, "open", fake_open, raising=False)
    monkeypatch.setattr(_memory.os, "sysconf", lambda name: (_ for _ in ()).throw(ValueError(name)))


def _meminfo(available: int, swap_free: int = 0) -> str:
    return (f"MemTotal:       {4 * available // 1024} kB\nMemFree:        1024 kB\n"
            f"MemAvailable:   {available // 1024} kB\nSwapTotal:      {swap_free // 1024} kB\n"
            f"SwapFree:       {swap_free // 1024} kB\n")


def _accs(k: int, d: int) -> list[ActivationCovarianceAccumulator]:
    return [ActivationCovarianceAccumulator(dim=d, precision="exact") for _ in range(k)]


def _need(k: int, d: int, rows: torch.Tensor) -> int:
    return _memory.measurement_bytes([d] * k, "exact", rows.numel() // d, device_type="cpu")


def test_a_cgroup_v2_limit_is_the_free_memory_in_a_container(monkeypatch, tmp_path):
    """A container limited to 2 GiB on a host with 64 GiB available: ``/proc/meminfo`` shows the host's memory,
    so a pass that needs 3 GiB passed the check and the kernel's OOM killer ended the process part-way. The
    cgroup's limit (less its usage, plus its reclaimable inactive file cache) is now the free memory."""
    rows = torch.zeros(4, 4096)
    need = _need(24, 4096, rows)
    assert 2 * GiB < need < 4 * GiB
    files = {"/proc/meminfo": _meminfo(64 * GiB), "/proc/self/cgroup": "0::/job/step\n",
             "/sys/fs/cgroup/job/memory.max": f"{4 * GiB}\n", "/sys/fs/cgroup/job/memory.current": f"{3 * GiB}\n",
             "/sys/fs/cgroup/job/memory.stat": f"anon {2 * GiB}\ninactive_file {1 * GiB}\nactive_file 4096\n",
             "/sys/fs/cgroup/job/step/memory.max": "max\n",
             "/sys/fs/cgroup/job/step/memory.current": f"{3 * GiB}\n"}
    _fake_files(monkeypatch, tmp_path, files)
    assert _memory.free_bytes(torch.device("cpu")) == 2 * GiB  # 4 - 3 + 1 (the inactive cache is reclaimable)
    with pytest.raises(MemoryError, match=r"24 layer\(s\) \(d=4096.*only 2\.00 GiB is free"):
        _memory.check_fits(_accs(24, 4096), rows)
    # the limit raised: it fits
    files["/sys/fs/cgroup/job/memory.max"] = f"{8 * GiB}\n"
    _memory.check_fits(_accs(24, 4096), rows)


def test_a_cgroup_v1_limit_of_the_containers_own_view(monkeypatch, tmp_path):
    """cgroup v1 (``memory.limit_in_bytes``): ``/proc/self/cgroup`` names the host's path, which the container
    does not see; its mount's root is its own cgroup. v1 writes "no limit" as a huge number."""
    rows = torch.zeros(4, 4096)
    files = {"/proc/meminfo": _meminfo(64 * GiB), "/proc/self/cgroup": "5:cpu:/\n4:memory:/docker/abc\n",
             "/sys/fs/cgroup/memory/memory.limit_in_bytes": f"{2 * GiB}\n",
             "/sys/fs/cgroup/memory/memory.usage_in_bytes": f"{1 * GiB}\n",
             "/sys/fs/cgroup/memory/memory.stat": f"inactive_file 7\ntotal_inactive_file {GiB // 2}\n"}
    _fake_files(monkeypatch, tmp_path, files)
    assert _memory.free_bytes(torch.device("cpu")) == GiB + GiB // 2
    with pytest.raises(MemoryError, match=r"only 1\.50 GiB is free"):
        _memory.check_fits(_accs(12, 4096), rows)
    files["/sys/fs/cgroup/memory/memory.limit_in_bytes"] = "9223372036854771712\n"  # unlimited: the host's memory
    assert _memory.free_bytes(torch.device("cpu")) == 64 * GiB
    _memory.check_fits(_accs(12, 4096), rows)


def test_swap_counts_on_the_cpu(monkeypatch, tmp_path):
    """1 GiB available and 8 GiB of free swap: a pass of 3 GiB runs (slowly, in swap) rather than being refused;
    the kernel kills nothing. Without the swap it is refused."""
    rows = torch.zeros(4, 4096)
    files = {"/proc/meminfo": _meminfo(1 * GiB, swap_free=8 * GiB), "/proc/self/cgroup": "0::/\n"}
    _fake_files(monkeypatch, tmp_path, files)
    assert _memory.free_bytes(torch.device("cpu")) == 9 * GiB
    _memory.check_fits(_accs(12, 4096), rows)
    files["/proc/meminfo"] = _meminfo(1 * GiB)
    with pytest.raises(MemoryError, match=r"only 1\.00 GiB is free"):
        _memory.check_fits(_accs(12, 4096), rows)


def test_unreadable_memory_is_no_check_and_no_crash(monkeypatch, tmp_path):
    """Neither /proc nor sysconf readable: no check (``None``), the user's forward runs. A CUDA driver that
    cannot say its free memory (``mem_get_info`` raising) failed the user's forward at its first rows."""
    _fake_files(monkeypatch, tmp_path, {"/proc/meminfo": "garbage\nMemAvailable: lots kB\n"})
    assert _memory.free_bytes(torch.device("cpu")) is None
    model = nn.Sequential(nn.Linear(8, 8))
    with sl.attach(model, "0") as capture:
        model(torch.randn(3, 8))
    assert capture.accumulators["0"].n_rows == 3

    def broken(device=None):
        raise RuntimeError("CUDA error: unspecified launch failure")

    monkeypatch.setattr(torch.cuda, "mem_get_info", broken)
    assert _memory.free_bytes(torch.device("cuda", 1)) is None


def test_the_refusal_counts_the_layers_that_fit(monkeypatch):
    """"about N fit" is the number of layers whose pass fits (the first N layers' estimate <= free < N + 1's);
    it was ``k * free // need``, which ignores that the one update on top does not shrink with the layer count
    (many rows per update: it said 9 of 10 fit where 5 do). When not even one layer fits, fewer layers is no
    remedy: the message says so and names the rows (it said "about 1 fit")."""
    d, k = 1024, 10
    rows = torch.zeros(65536, d)
    sizes = [_memory.accumulator_bytes(d, "exact", 65536, device_type="cpu")] * k
    held, update = sizes[0][0], max(sizes[0][1:])
    assert update > 10 * held  # the update dominates
    free = held * 5 + update + 1  # exactly 5 layers fit
    monkeypatch.setattr(_memory, "free_bytes", lambda device: free)
    with pytest.raises(MemoryError) as e:
        _memory.check_fits(_accs(k, d), rows)
    n = int(re.search(r"about (\d+) fit", str(e.value)).group(1))
    assert n == 5 and _memory._peak(sizes[:n]) <= free < _memory._peak(sizes[:n + 1])

    monkeypatch.setattr(_memory, "free_bytes", lambda device: update // 2)  # not even one layer's update
    with pytest.raises(MemoryError) as e:
        _memory.check_fits(_accs(k, d), rows)
    msg = str(e.value)
    assert "fit)" not in msg and "Even one layer does not fit" in msg and "65536 rows" in msg, msg
    assert "fewer rows per forward" in msg, msg


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("order", ["plain first", "transform first"])
def test_a_compiled_graph_run_inside_and_outside_a_transform_reads_only_the_plain_calls(order, fresh_dynamo):
    """``_functorch_active`` is a Dynamo constant (the torch 2.4 fix): a compiled model called plainly and
    inside eager ``grad`` / ``vmap`` (on plain inputs), in either order, must not reuse a folded answer of the
    other context. Its forwards inside the transforms read nothing, its plain ones read every row once
    (float64 reference), and the transformed results equal the uncompiled ones. (torch 2.13 runs the model
    eagerly inside the transforms, not its graph: this holds the behaviour should a later torch run it.)"""
    from torch.func import grad, vmap

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 1)).double()
    xs = [torch.randn(5, 6, dtype=torch.float64) for _ in range(4)]
    w = torch.randn(3, dtype=torch.float64)

    def outer(f, w, x):  # the compiled model run on plain tensors inside a transform of something else
        return (w * f(x).sum()).sum()

    expected_grad = grad(outer, argnums=1)(model, w, xs[0])
    expected_vmap = vmap(lambda wi: outer(model, wi, xs[0]))(w)
    with sl.attach(model, "0", precision="float64") as capture:
        compiled = torch.compile(model, backend="aot_eager")
        fed = []
        steps = ["plain", "grad", "vmap", "plain"] if order == "plain first" else ["grad", "vmap", "plain", "grad"]
        for i, step in enumerate(steps):
            x = xs[i]
            if step == "plain":
                compiled(x)
                fed.append(x)
            elif step == "grad":
                torch.testing.assert_close(grad(outer, argnums=1)(compiled, w, x),
                                           grad(outer, argnums=1)(model, w, x), rtol=1e-12, atol=1e-12)
            else:
                torch.testing.assert_close(vmap(lambda wi, x=x: outer(compiled, wi, x))(w),
                                           vmap(lambda wi, x=x: outer(model, wi, x))(w), rtol=1e-12, atol=1e-12)
        spectrum = capture.compute()["0"]
    assert expected_grad.shape == w.shape and expected_vmap.shape == w.shape
    rows = torch.cat([model[0](x) for x in fed]).detach()
    assert spectrum.n_rows == rows.shape[0]
    xc = rows - rows.mean(0)
    ref = torch.linalg.eigvalsh(xc.T @ xc / (rows.shape[0] - 1)).flip(0).clamp_min(0)
    torch.testing.assert_close(spectrum.values.double(), ref, rtol=1e-9, atol=1e-12)


def test_one_compiled_graph_with_plain_forwards_around_a_transform_reads_the_plain_ones(fresh_dynamo):
    """``_functorch_active`` is folded per call while Dynamo traces: one fullgraph graph that runs the captured
    model plainly, then inside ``vmap(grad(functional_call(...)))``, then plainly again reads the two plain
    forwards' rows (float64 reference) and not the transformed ones, and gives the uncompiled results.
    (Eager ``grad``/``vmap`` around a compiled model do not run its graph: torch runs it eagerly there.)"""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 1)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(5, 6, dtype=torch.float64)

    def step(p, x):
        out = model(x)
        g = vmap(grad(lambda p, xi: functional_call(model, p, (xi[None],)).sum()), in_dims=(None, 0))(p, x)
        return out, g, model(x + 1)

    expected = step(params, x)
    try:
        torch.compile(step, backend="aot_eager", fullgraph=True)(params, x)
    except torch._dynamo.exc.Unsupported as exc:  # torch 2.4: functional_call inside vmap(grad(...))
        pytest.skip(f"torch {torch.__version__}'s Dynamo cannot compile this step: {str(exc).splitlines()[0]}")
    torch._dynamo.reset()
    with sl.attach(model, "0", precision="float64") as capture:
        got = torch.compile(step, backend="aot_eager", fullgraph=True)(params, x)
        spectrum = capture.compute()["0"]
    torch.testing.assert_close(got[0], expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[2], expected[2], rtol=1e-12, atol=1e-12)
    for k in expected[1]:
        torch.testing.assert_close(got[1][k], expected[1][k], rtol=1e-12, atol=1e-12)
    rows = torch.cat([model[0](x), model[0](x + 1)]).detach()
    assert spectrum.n_rows == rows.shape[0]
    xc = rows - rows.mean(0)
    ref = torch.linalg.eigvalsh(xc.T @ xc / (rows.shape[0] - 1)).flip(0).clamp_min(0)
    torch.testing.assert_close(spectrum.values.double(), ref, rtol=1e-9, atol=1e-12)


def test_cuda_free_memory_is_read_on_the_rows_device_and_other_devices_are_not_checked(monkeypatch):
    """The rows' device, index included (a model on cuda:1 while cuda:0 is current), is the one read; MPS, XLA,
    a privateuse backend and meta rows are not checked (``None``) and not read at all."""
    per_device = {0: (1 * GiB, 0, 0), 1: (5 * GiB, 3 * GiB, 2 * GiB)}  # free, reserved, allocated
    asked = []

    def index(device):
        asked.append(device)
        return torch.device(device).index

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (per_device[index(device)][0], 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: per_device[index(device)][1])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: per_device[index(device)][2])
    assert _memory.free_bytes(torch.device("cuda", 1)) == 6 * GiB
    assert asked and all(torch.device(d) == torch.device("cuda", 1) for d in asked)
    asked.clear()
    for device in ("mps", "xla", "privateuseone", "hpu", "meta"):
        assert _memory.free_bytes(torch.device(device)) is None
    _memory.check_fits(_accs(80, 65536), torch.empty(8, 65536, device="meta"))  # 80 x 64 GiB: not checked
    assert asked == []


def test_a_capture_reset_is_checked_again_and_only_at_its_first_rows(monkeypatch):
    """``reset()`` frees every layer's state, so the next forward is a new pass: checked again (refused when
    the memory went meanwhile). Within a pass only the first rows are checked: later forwards do not read
    the free memory."""
    reads = []

    def free(device):
        reads.append(device)
        return free.value

    free.value = 1 << 30
    monkeypatch.setattr(_memory, "free_bytes", free)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    x = torch.randn(4, 8)
    with sl.attach(model, ["0", "2"]) as capture:
        for _ in range(3):
            model(x)
        assert len(reads) == 1 and all(a.n_rows == 12 for a in capture.accumulators.values())
        capture.reset()
        free.value = 1000
        with pytest.raises(MemoryError, match=r"2 layer\(s\) \(d=8"):
            model(x)
        assert len(reads) == 2 and not any(a.initialized for a in capture.accumulators.values())
        free.value = 1 << 30
        model(x)
        assert len(reads) == 3 and all(a.n_rows == 4 for a in capture.accumulators.values())


def test_a_layer_too_wide_for_the_device_is_not_told_to_feed_fewer_rows(monkeypatch):
    """One layer whose sums alone exceed the free memory (d = 16384: 4 GiB of float64 sums, 4 GiB for their
    solve, 2 GiB free): fewer rows per forward would not help, so the message does not say it does."""
    monkeypatch.setattr(_memory, "free_bytes", lambda device: 2 * GiB)
    with pytest.raises(MemoryError) as e:
        _memory.check_fits(_accs(3, 16384), torch.zeros(2, 16384))
    msg = str(e.value)
    assert "Even one layer of width d=16384 does not fit" in msg and "fewer rows" not in msg, msg
    assert "fit)" not in msg, msg


def test_a_small_refusal_names_its_bytes(monkeypatch):
    """A pass of a few MiB refused on a nearly full device said "needs about 0.00 GiB ... only 0.00 GiB is free"."""
    rows = torch.zeros(4, 256)
    need = _need(8, 256, rows)
    monkeypatch.setattr(_memory, "free_bytes", lambda device: need // 2)
    with pytest.raises(MemoryError) as e:
        _memory.check_fits(_accs(8, 256), rows)
    msg = str(e.value)
    assert f"GiB ({need / 2**20:.1f} MiB) on cpu" in msg and f"only 0.00 GiB ({need // 2 / 2**20:.1f} MiB) is free" in msg, msg
