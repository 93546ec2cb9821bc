"""A faked NCCL rank for the device-choice tests (no GPU, no second process): what ``torch.distributed`` and
``torch.cuda`` answer to the library, the collectives replaced by the test's own recorders."""

from __future__ import annotations

import types


def fake_nccl_rank1(monkeypatch, state: dict, **collectives) -> None:
    """This process as rank 1 of 2 under "nccl" with 2 GPUs, ``set_device`` never called (current device 0), CUDA
    initialized, ``LOCAL_RANK`` unset, the default group bound to ``state["bound"]`` (read at each call: a test
    may bind one later); ``collectives``: ``torch.distributed`` functions replaced (``all_reduce=...``)."""
    import torch
    import torch.distributed as dist

    fakes = {"is_initialized": lambda: True, "get_rank": lambda group=None: 1,
             "get_world_size": lambda group=None: 2, "get_backend": lambda group=None: "nccl", **collectives}
    for name, value in fakes.items():
        monkeypatch.setattr(dist, name, value)
    monkeypatch.setattr(dist.distributed_c10d, "_get_default_group",
                        lambda: types.SimpleNamespace(bound_device_id=state["bound"]))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
