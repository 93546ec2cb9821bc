"""Review of the day's capture-side merges (the channels-first rule by shape, the memory check with real widths):
the regressions found, and guards for what held.

Channels-first rule: a block whose last module of known size is a Linear or LayerNorm was refused when its
output held that width at dim 1 and another size last, even where nothing in the block is channels-first: an
MoE block whose router Linear (one output per expert) is registered after its experts (bare parameters), as
Hugging Face's ``LongcatFlashMoE`` is, at a sequence length equal to the expert count; a Linear then an LSTM;
MLP-Mixer's token mixing with its transposes inside (at every input).
Such a Linear or LayerNorm now counts only in a block that also holds a channels-first module of its size (a
conv, a norm; or one of unknown size, a pooling layer), as ConvNeXt's and Wav2Vec2's do.

Memory check: a layer fed no rows (an MoE expert no token was routed to) holds no state, so every forward ran
the check again (a free-memory read, ~2 ms on the CPU, per forward, for a capture whose layers got no rows),
and a layer of a width not known before its rows was counted at its update of no rows and never checked at
its real ones. Rows of which there are none are no longer checked.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support.data import cov_eigs
from torch import nn

import spectral_lens as sl
from spectral_lens import _memory
from spectral_lens._memory import accumulator_bytes

TOL = 1e-10


def _check(spectrum, rows: torch.Tensor) -> None:
    ref = cov_eigs(rows)
    assert spectrum.n_rows == rows.numel() // rows.shape[-1] and spectrum.dim == rows.shape[-1]
    assert np.abs(spectrum.values.numpy() - ref).max() <= TOL * ref[0]


def _output(model: nn.Module, name: str, *args) -> torch.Tensor:
    got = {}
    h = model.get_submodule(name).register_forward_hook(lambda m, a, o: got.setdefault("o", o))
    try:
        with torch.no_grad():
            model(*args)
    finally:
        h.remove()
    return got["o"]


def _read_as_it_is(model: nn.Module, name: str, *args) -> None:
    """``attach(model, name)`` (no pick) measures the output as rows of its last dimension, as float64 does."""
    with sl.attach(model, name, precision="float64") as cap, torch.no_grad():
        model(*args)
    _check(cap.accumulators[name].compute(), _output(model, name, *args))


# ----------------------------------------------------------------------------------- the channels-first rule
class Router(nn.Module):
    def __init__(self, d: int, experts: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(d, experts, bias=False)

    def forward(self, x):
        return self.classifier(x).softmax(-1).topk(2, dim=-1)


class ParamExperts(nn.Module):
    """Experts as bare (experts, d, ff) / (experts, ff, d) parameters, as transformers 5 holds them."""

    def __init__(self, d: int, ff: int, experts: int) -> None:
        super().__init__()
        self.up = nn.Parameter(torch.randn(experts, d, ff) / d**0.5)
        self.down = nn.Parameter(torch.randn(experts, ff, d) / ff**0.5)

    def forward(self, x, weights, index):
        out = torch.zeros_like(x)
        for k in range(index.shape[-1]):
            for e in index[:, k].unique().tolist():
                rows = index[:, k] == e
                out[rows] += weights[rows, k, None] * (F.silu(x[rows] @ self.up[e]) @ self.down[e])
        return out


class LongcatLikeMoE(nn.Module):
    """Hugging Face's LongcatFlashMoE layout: the experts first, then the router (a Linear of one output per
    expert) as its last module of known size; the output (B, T, d) is features last."""

    def __init__(self, d: int = 6, ff: int = 5, experts: int = 8) -> None:
        super().__init__()
        self.experts = ParamExperts(d, ff, experts)
        self.router = Router(d, experts)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        weights, index = self.router(flat)
        return self.experts(flat, weights, index).reshape(x.shape)


class ProjectedLSTM(nn.Module):
    """A Linear(d, h) then an LSTM(h, h2): (B, T, h2) out, features last."""

    def __init__(self, d: int = 4, h: int = 8, h2: int = 5) -> None:
        super().__init__()
        self.proj = nn.Linear(d, h)
        self.lstm = nn.LSTM(h, h2, batch_first=True)

    def forward(self, x):
        return self.lstm(self.proj(x))[0]


class TokenMixing(nn.Module):
    """MLP-Mixer's token mixing with the transposes inside: Linear(T, h), GELU, Linear(h, T) over the positions,
    (B, T, d) in and out, features last."""

    def __init__(self, t: int = 7, h: int = 5) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(t, h), nn.Linear(h, t)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x.transpose(1, 2)))).transpose(1, 2)


def test_token_mixing_with_its_transposes_inside_is_read_as_it_is():
    """Its last Linear has T outputs, which the output holds at dim 1 at every input (T is its input size):
    it was refused at every forward as permuted back to channels first."""
    torch.manual_seed(0)
    model = TokenMixing().double().eval()
    _read_as_it_is(model, "", torch.randn(3, 7, 6, dtype=torch.float64))


def test_an_moe_block_ending_in_its_router_linear_is_read_as_it_is_at_t_equal_to_the_expert_count():
    """T = 8 = the router's 8 outputs at dim 1, d = 6 last, and no Linear of width 6 in the block: it was
    refused as 'a Linear of 8 features permuted back to channels first'. Nothing in it is channels-first."""
    torch.manual_seed(0)
    model = LongcatLikeMoE().double().eval()
    for t in (8, 7):
        _read_as_it_is(model, "", torch.randn(2, t, 6, dtype=torch.float64))


def test_hugging_face_longcat_flash_moe_is_read_as_it_is_at_t_equal_to_its_expert_count():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "LongcatFlashConfig"):
        pytest.skip("transformers without LongcatFlash")
    torch.manual_seed(0)
    cfg = transformers.LongcatFlashConfig(
        hidden_size=32, num_layers=1, num_attention_heads=4, vocab_size=100, n_routed_experts=6, zero_expert_num=2,
        moe_topk=2, expert_ffn_hidden_size=16, ffn_hidden_size=64, kv_lora_rank=16, q_lora_rank=16,
        qk_rope_head_dim=4, head_dim=4, qk_nope_head_dim=4, v_head_dim=8)
    model = transformers.LongcatFlashForCausalLM(cfg).double().eval()
    ids = torch.randint(0, 100, (1, 8))  # T = 8 = 6 routed + 2 zero experts: the router's outputs
    for name in ("model.layers.0.mlp", "model.layers.0"):
        _read_as_it_is(model, name, ids)


def test_a_linear_then_an_lstm_is_read_as_it_is_at_t_equal_to_the_linear_width():
    torch.manual_seed(0)
    model = ProjectedLSTM().double().eval()
    _read_as_it_is(model, "", torch.randn(3, 8, 4, dtype=torch.float64))


def test_a_block_ending_in_a_linear_permuted_back_over_a_conv_is_still_refused():
    """The rule's own case, kept: a depthwise conv of C channels, a Linear of C over channels-last features,
    then back to (N, C, L) at L != C: refused with the pick that reads rows of channels."""

    class Block(nn.Module):
        def __init__(self, c: int = 6) -> None:
            super().__init__()
            self.dw = nn.Conv1d(c, c, 3, padding=1, groups=c)
            self.pw = nn.Linear(c, c)

        def forward(self, x):
            return self.pw(self.dw(x).transpose(1, 2)).transpose(1, 2)

    torch.manual_seed(0)
    model = nn.Sequential(Block()).double().eval()
    x = torch.randn(2, 6, 9, dtype=torch.float64)
    with sl.attach(model, "0") as cap, pytest.raises(TypeError, match=r"Linear of 6 features.*movedim\(1, -1\)"):
        model(x)
    assert cap.accumulators["0"].n_rows == 0
    pick = lambda out: out.movedim(1, -1)
    with sl.attach(model, "0", pick=pick, precision="float64") as cap:
        model(x)
    _check(cap.accumulators["0"].compute(), pick(_output(model, "0", x)))


# ------------------------------------------------------------------------------------------ the memory check
class Routed(nn.Module):
    """``a`` (an nn.Linear: width known) fed every forward, ``b`` (a block of width 64: not known before its
    rows; ``known``: an nn.Linear of 64) fed the rows ``route`` chooses: none, as an MoE expert no token was
    routed to, or all."""

    def __init__(self, known: bool = False) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 64) if known else nn.Sequential(nn.Linear(4, 64), nn.Tanh())
        self.route = True
        self.double()

    def forward(self, x):
        flat = x.reshape(-1, 4)
        return self.a(x).sum() + self.b(flat if self.route else flat[:0]).sum()


def test_a_layer_fed_no_rows_is_not_checked_at_every_forward(monkeypatch):
    """A capture whose one layer gets no rows holds no state: the check ran (and read the free memory) at
    every forward. It runs once, at the layer's first real rows."""
    reads = []
    monkeypatch.setattr(_memory, "free_bytes", lambda device: reads.append(device) or 1 << 40)
    model = Routed()
    model.route = False
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    with sl.attach(model, "b") as cap, torch.no_grad():
        for _ in range(5):
            model(x)
        assert reads == [] and not cap.accumulators["b"].initialized
        model.route = True
        model(x)
        model(x)
    assert len(reads) == 1 and cap.accumulators["b"].n_rows == 30


def test_a_layer_first_fed_no_rows_is_checked_at_its_real_rows(monkeypatch):
    """``b``'s width (64) is not known before its rows; its first call brings none. It was counted then, at an
    update of no rows, and never checked again: its real rows (12000 of them) ran into memory the check had
    not counted. Now the check comes at those rows: one byte short, a MemoryError naming b, and no state."""
    rows = 12000
    a, small = (accumulator_bytes(4, "exact", rows, device_type="cpu", rows_float64=True),
                accumulator_bytes(64, "exact", 0, device_type="cpu", rows_float64=True))
    real = accumulator_bytes(64, "exact", rows, device_type="cpu", rows_float64=True)
    need = _memory._peak([(0, a[1], a[2]), real])  # a holds its state by then: out of the free memory already
    assert _memory._peak([a, small]) < need  # the check at no rows passed where the real rows do not fit
    monkeypatch.setattr(_memory, "free_bytes", lambda device: need - 1)
    model = Routed()
    x = torch.randn(rows // 4, 4, 4, dtype=torch.float64)
    with sl.attach(model, ["a", "b"]) as cap, torch.no_grad():
        model.route = False
        model(x)
        model.route = True
        with pytest.raises(MemoryError, match=r"layer 'b' got its first rows, of width d=64 \(12000 rows per update\)"):
            model(x)
        assert not cap.accumulators["b"].initialized and cap.accumulators["a"].n_rows == 2 * rows
    monkeypatch.setattr(_memory, "free_bytes", lambda device: need)
    with sl.attach(model, ["a", "b"], precision="float64") as cap, torch.no_grad():
        model.route = False
        model(x)
        model.route = True
        model(x)
    _check(cap.accumulators["b"].compute(), _output(model, "b", x))


def test_a_capture_dropped_without_remove_claims_nothing(monkeypatch):
    """A capture whose pass began (its check passed) and whose hooks are on claims its layers without state
    (b, an nn.Linear of 64, never fed); dropped with its model, without remove(), it claims nothing more:
    another capture's check, with memory for one such pass, does not count it."""
    import gc

    x = torch.randn(3, 5, 4, dtype=torch.float64)
    one = accumulator_bytes(64, "exact", 15, device_type="cpu", rows_float64=True)
    a = accumulator_bytes(4, "exact", 15, device_type="cpu", rows_float64=True)
    monkeypatch.setattr(_memory, "free_bytes", lambda device: _memory._peak([a, one]))  # one pass, not two
    model = Routed(known=True)
    model.route = False
    cap = sl.attach(model, ["a", "b"])  # a's rows: the pass begins, b (counted at 64) claimed
    with torch.no_grad():
        model(x)
    assert cap.accumulators["a"].initialized and not cap.accumulators["b"].initialized
    del model, cap
    gc.collect()
    other = Routed(known=True)
    with sl.attach(other, ["a", "b"]) as cap2, torch.no_grad():
        other(x)
    assert cap2.accumulators["b"].n_rows == 15


def test_two_threads_measuring_two_models_at_once_each_get_their_spectra(monkeypatch):
    monkeypatch.setattr(_memory, "free_bytes", lambda device: 1 << 40)
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    results, errors = {}, []

    def run(i: int) -> None:
        try:
            model = Routed()
            with sl.attach(model, ["a", "b"], precision="float64") as cap, torch.no_grad():
                for _ in range(3):
                    model(x)
            results[i] = (cap.compute(), model)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and sorted(results) == [0, 1]
    for spectra, model in results.values():
        _check(spectra["b"], torch.cat([_output(model, "b", x)] * 3))
    assert not any(getattr(c, "active", False) for c in list(_memory._PASSES.keys()))


# --------------------------------------------------------------------------------------------- two ranks
def _rank_worker(rank: int, port: int, out: str) -> None:
    """A lens over an up-projection (width known) and blocks (counted at the first block's rows): rank 1's
    memory is enough at the pass's first check and gone at the blocks' (its free memory mocked)."""
    from support.models import TinyLM, lm_pool
    from support.ranks import gloo_group, write_case

    if rank == 1:
        reads = []
        _memory.free_bytes = lambda device: reads.append(device) or (1 << 40 if len(reads) == 1 else 1000)
    with gloo_group(rank, port, 2, 30):
        torch.manual_seed(0)
        lens = sl.SpectralLens(TinyLM(layers=2), lm_pool(), layers=["h.0.mlp.c_fc", "h.0", "h.1"], params=())
        try:
            lens.measure(0, 0)
            error = None
        except Exception as exc:  # noqa: BLE001 - recorded for the parent
            error = f"{type(exc).__name__}: {exc}"
        write_case(out, "second-check", rank, {"error": error})


@pytest.mark.distributed
def test_the_second_check_failing_on_one_rank_makes_every_rank_raise(tmp_path):
    from support.ranks import case_results, run_ranks

    hung = run_ranks(_rank_worker, 2, tmp_path, 120.0)
    got = case_results(tmp_path, ["second-check"], 2)["second-check"]
    assert hung == [] and None not in got, (hung, got)
    assert got[1]["error"].startswith("MemoryError: spectral_lens: layer 'h.0' got its first rows"), got
    assert got[0]["error"].startswith("RuntimeError") and "rank(s) [1]" in got[0]["error"], got
