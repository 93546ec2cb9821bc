"""Tiny stand-ins for the names the docs' code blocks leave to the reader.

Each fixture is a factory ``f(ns) -> value`` registered under the name the prose uses; the
docs-blocks test injects a fixture only when a block reads that name and the page has not defined
it, so a block that defines ``model`` itself uses its own. Sizes are the smallest that keep the
prose true: the README's ``transformer.h.11`` and its d12 tail window [100, 200] need 12 blocks,
width 256 and at least 200 token rows; so ``model`` is a cheap 12-block network with nanoGPT's
module names (two 256 x 256 matrices per block; learned positions keep its rows full-rank) and the pool holds 512 tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.models import TinyGPT, lm_pool

import spectral_lens as sl

VOCAB, WIDTH, DEPTH, CTX = 128, 256, 12, 64
FIXTURES = {}


def fixture(*names):
    def register(fn):
        for name in names:
            FIXTURES[name] = fn
        return fn

    return register


def _pool(n_batches: int = 2, batch: int = 4, seed: int = 0):
    return lm_pool(n_batches, batch=batch, t=CTX, vocab=VOCAB, seed=seed)


class _Mixer(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.c_attn = torch.nn.Linear(d, d)
        self.c_proj = torch.nn.Linear(d, d)

    def forward(self, x):
        return self.c_proj(torch.nn.functional.gelu(self.c_attn(x)))


class _Block(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(d)
        self.attn = _Mixer(d)

    def forward(self, x):
        return x + self.attn(self.ln_1(x))


class DocsLM(torch.nn.Module):
    """``idx (B, T) -> logits (B, T, vocab)`` with nanoGPT's names: ``transformer.h.N.attn.c_proj``."""

    def __init__(self, vocab: int = VOCAB, d: int = WIDTH, layers: int = DEPTH) -> None:
        super().__init__()
        self.transformer = torch.nn.ModuleDict(dict(
            wte=torch.nn.Embedding(vocab, d), wpe=torch.nn.Embedding(CTX, d),
            h=torch.nn.ModuleList(_Block(d) for _ in range(layers)),
            ln_f=torch.nn.LayerNorm(d)))
        self.lm_head = torch.nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


@fixture("model")
def _model(ns):
    torch.manual_seed(0)
    return DocsLM()


@fixture("heldout_pool", "heldout_batches", "pool")
def _heldout(ns):
    return _pool(seed=1)


@fixture("train_batches")
def _train(ns):
    return _pool(n_batches=4, batch=4, seed=2)


def need(ns: dict, name: str):
    """``ns[name]``, injecting its fixture first when the page has not defined it."""
    if name not in ns:
        ns[name] = FIXTURES[name](ns)
    return ns[name]


@fixture("optimizer")
def _optimizer(ns):
    return torch.optim.AdamW(need(ns, "model").parameters(), lr=1e-3)


@fixture("total_steps")
def _total_steps(ns):
    return 10


@fixture("T", "total_tokens", "budget")
def _budget(ns):
    return 10 * 4 * CTX


@fixture("tokens", "tokens_seen")
def _tokens(ns):
    return 4 * CTX


@fixture("step")
def _step(ns):
    return 1


@fixture("val_loss", "loss")
def _loss(ns):
    return 4.5


@fixture("tps")
def _tps(ns):
    return 1.0e5


@fixture("b_simple")
def _b_simple(ns):
    return 37.0


@fixture("tier")
def _tier(ns):
    return 8


@fixture("eval_every", "measure_every")
def _every(ns):
    return 2


@fixture("training_loop")
def _training_loop(ns):
    return lambda: iter(range(0, 3))


@fixture("evaluate")
def _evaluate(ns):
    return lambda: 4.4


@fixture("name")
def _name(ns):
    return f"transformer.h.{DEPTH - 1}.attn.c_proj.weight"


def _power_law(dim: int, alpha: float, kind: str) -> sl.Spectrum:
    r = np.arange(1, dim + 1, dtype=np.float64)
    return sl.Spectrum(torch.from_numpy(r**-alpha), n_rows=16 * dim, dim=dim, kind=kind)


@fixture("act_spectrum", "spectrum")
def _act_spectrum(ns):
    return _power_law(WIDTH, 1.1, "activation_covariance")


@fixture("grad_spectrum")
def _grad_spectrum(ns):
    return _power_law(16, 0.8, "gradient")


@fixture("runs", "run_dirs")
def _runs(ns):
    from spectral_lens.analysis.synthetic import write_theorem6_sweep

    if "_fixture_runs" not in ns:  # one synthetic sweep per page, for both names
        ns["_fixture_runs"] = [str(p) for p in write_theorem6_sweep(
            "fixture-runs", tiers=(1, 2, 4, 8), family="FlexWin", dim=256, grad_dim=64, n_measure=12)]
    return list(ns["_fixture_runs"])


@fixture("seed_runs")
def _seed_runs(ns):
    """Three synthetic runs of one configuration, seeds 0-2 (noisy losses and spectra)."""
    from spectral_lens.analysis.synthetic import write_theorem6_sweep
    from spectral_lens.records import RunRecord

    return [RunRecord.open(write_theorem6_sweep(f"fixture-seeds/s{i}", tiers=(8,), family=f"base-seed{i}", dim=256,
                                                grad_dim=64, n_measure=12, noise=0.02, seed=i)[0]) for i in range(3)]


def _pair(ns):
    """Two synthetic runs for a transition (batch tiers 8 and 2 of one family), written once a page."""
    from spectral_lens.analysis.synthetic import write_theorem6_sweep
    from spectral_lens.records import RunRecord

    if "_fixture_pair" not in ns:
        ns["_fixture_pair"] = [RunRecord.open(p) for p in write_theorem6_sweep(
            "fixture-pair", tiers=(8, 2), family="pair", dim=256, grad_dim=64, n_measure=12)]
    return ns["_fixture_pair"]


@fixture("base")
def _base(ns):
    return _pair(ns)[0]


@fixture("variant")
def _variant(ns):
    return _pair(ns)[1]


class CastedLinear(torch.nn.Linear):
    """A Linear subclass, as modded-nanogpt's (the gradients page registers a fast path for it)."""


class MyLayer(torch.nn.Module):
    """A custom layer for the gradients page's decorator example."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(d, d))

    def forward(self, x):
        return x @ self.weight.T


@fixture("CastedLinear")
def _casted(ns):
    return CastedLinear


@fixture("MyLayer")
def _my_layer(ns):
    return MyLayer


# ----------------------------------------------------------------- framework fixtures (lazy imports)
def _require(module: str, extra: str):
    return pytest.importorskip(module, reason=f"this block needs {module} (extra {extra})")


class _RandomTokens(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _random_ids(n: int, seed: int):
    return torch.randint(0, VOCAB, (n, 16), generator=torch.Generator().manual_seed(seed))


@fixture("hf_model")
def _hf_model(ns):
    transformers = _require("transformers", "hf")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(cfg)


@fixture("hf_heldout_pool")
def _hf_pool(ns):
    ids = _random_ids(4, 9)
    return [{"input_ids": ids[:2], "labels": ids[:2]}, {"input_ids": ids[2:], "labels": ids[2:]}]


@fixture("train_dataset")
def _train_dataset(ns):
    return _RandomTokens(_random_ids(32, 0))


@fixture("training_args")
def _training_args(ns):
    transformers = _require("transformers", "hf")
    _require("accelerate", "hf")
    return transformers.TrainingArguments(output_dir="hf-out", max_steps=4, per_device_train_batch_size=4,
                                          report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)


@fixture("lit_module")
def _lit_module(ns):
    pl = _require("lightning.pytorch", "lightning")
    import torch.nn.functional as F

    class LitGPT(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = TinyGPT(vocab=VOCAB, d=32, heads=2, layers=2, ctx=CTX)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x).flatten(0, 1), y.flatten())

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    return LitGPT()


@fixture("train_loader")
def _train_loader(ns):
    return torch.utils.data.DataLoader(_pool(n_batches=4, batch=4, seed=3), batch_size=None)
