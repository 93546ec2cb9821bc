"""attach(): selection, tensor picking, masks, and that measuring leaves the model untouched."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from spectral_lens import CompiledModelWarning, attach, select_modules


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * d, d))

    def forward(self, x):
        return x + self.mlp(self.ln(x))


class Tiny(nn.Module):
    def __init__(self, d: int = 16, n: int = 3, vocab: int = 50) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x), {"aux": x * 2}


def _all_hooks(model: nn.Module) -> list:
    out = []
    for m in model.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_forward_hooks_with_kwargs"):
            out.append(len(getattr(m, attr, {})))
    return out


def test_outputs_grads_mode_rng_unchanged_and_no_hooks_left():
    torch.manual_seed(0)
    model = Tiny()
    model.train()
    idx = torch.randint(0, 50, (2, 7))
    hooks_before = _all_hooks(model)

    def run():
        torch.manual_seed(1)
        model.zero_grad(set_to_none=True)
        out = model(idx)
        out.square().mean().backward()
        return out.detach().clone(), [p.grad.clone() for p in model.parameters()], torch.get_rng_state()

    ref_out, ref_grads, ref_rng = run()
    with attach(model, "blocks.*") as cap:
        out, grads, rng = run()
        assert len(cap.accumulators) == 3
    assert torch.equal(out, ref_out)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    assert torch.equal(rng, ref_rng)
    assert model.training
    assert _all_hooks(model) == hooks_before
    spectra = cap.compute()
    assert set(spectra) == {"blocks.0", "blocks.1", "blocks.2"}
    assert spectra["blocks.2"].n_rows == 14 and spectra["blocks.2"].source == "blocks.2"


def test_hooks_removed_when_forward_raises_and_user_hooks_kept():
    model = Tiny()
    calls = []
    user = model.blocks[1].register_forward_hook(lambda m, a, o: calls.append(1))
    before = _all_hooks(model)
    with pytest.raises(IndexError):
        with attach(model, "blocks.1"):
            model(torch.tensor([[999]]))  # out-of-vocabulary id raises inside the forward
    assert _all_hooks(model) == before
    model(torch.tensor([[1, 2]]))
    assert calls == [1]  # the user's hook survived and still fires
    user.remove()


def test_measured_rows_are_the_module_outputs():
    torch.manual_seed(0)
    model = Tiny().double().eval()
    idx = torch.randint(0, 50, (4, 9))
    captured = {}
    h = model.blocks[2].register_forward_hook(lambda m, a, o: captured.setdefault("x", o.detach().clone()))
    with attach(model, "blocks.2", precision="float64") as cap:
        model(idx)
    h.remove()
    rows = captured["x"].reshape(-1, 16).numpy()
    ref = np.linalg.eigvalsh(np.cov(rows, rowvar=False))[::-1]
    got = cap.accumulators["blocks.2"].compute().values.numpy()
    assert np.abs(got - np.clip(ref, 0, None)).max() <= 1e-10 * ref[0]


def test_mask_context_selects_valid_positions():
    torch.manual_seed(0)
    model = Tiny().double().eval()
    idx = torch.randint(0, 50, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[0, 5:] = False
    mask[2, 2:] = False
    with attach(model, "blocks.0", precision="float64") as cap, cap.mask(mask):
        model(idx)
    ref = attach(model, "blocks.0", precision="float64")
    with ref:
        for b in range(3):
            model(idx[b : b + 1, : int(mask[b].sum())])  # causal-free MLP model: same rows either way
    a = cap.accumulators["blocks.0"].covariance()
    b = ref.accumulators["blocks.0"].covariance()
    assert cap.accumulators["blocks.0"].n_rows == int(mask.sum())
    assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_selection_by_glob_regex_callable_and_list():
    model = Tiny()
    names = lambda t: [n for n, _ in select_modules(model, t)]
    assert names("blocks.1.mlp") == ["blocks.1.mlp"]
    assert names("blocks.*.ln") == ["blocks.0.ln", "blocks.1.ln", "blocks.2.ln"]
    assert names(re.compile(r"blocks\.[02]")) == ["blocks.0", "blocks.2"]
    assert names(lambda n, m: isinstance(m, nn.Embedding)) == ["emb"]
    assert names(["head", "emb"]) == ["emb", "head"]  # model order, not target order


def test_no_match_lists_close_names():
    with pytest.raises(ValueError, match=r"no module matches target 'block.1'.*blocks\.1"):
        select_modules(Tiny(), "block.1")
    with pytest.raises(TypeError, match="module target"):
        select_modules(Tiny(), 3.5)


def test_tuple_and_dict_outputs_need_an_explicit_pick():
    model = TupleOut()
    with attach(model, "") as cap:  # "" is the root module's name
        with pytest.raises(TypeError, match=r"output is tuple, expected a tensor \(pass pick=0"):
            model(torch.randn(3, 4))
    with attach(model, "", pick=0) as cap:
        model(torch.randn(3, 4))
    assert cap.accumulators[""].n_rows == 3
    with attach(model, "", pick=lambda out: out[1]["aux"]) as cap:
        model(torch.randn(5, 4))
    assert cap.accumulators[""].n_rows == 5


def test_compiled_wrapper_warns():
    model = Tiny()
    compiled = torch.compile(model)  # wrapping only; nothing is compiled until called
    with pytest.warns(CompiledModelWarning, match="_orig_mod"):
        cap = attach(compiled, "_orig_mod.blocks.0")
    cap.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attach(model, "blocks.0").remove()


def test_glob_segments():
    model = Tiny()
    names = lambda t: [n for n, _ in select_modules(model, t)]
    assert names("blocks.*") == ["blocks.0", "blocks.1", "blocks.2"]
    assert names("blocks.**.0") == ["blocks.0.mlp.0", "blocks.1.mlp.0", "blocks.2.mlp.0"]
    assert names("blocks.[!01]") == ["blocks.2"]
    assert names("blocks.?.ln") == ["blocks.0.ln", "blocks.1.ln", "blocks.2.ln"]
    assert names("blocks.[1-2]") == ["blocks.1", "blocks.2"]


class Exploding(nn.Module):
    """A module whose forward must never run during selection (nn.Module is callable)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, *args):
        raise AssertionError("the target module's forward was called as a predicate")


def test_module_objects_are_targets_matched_by_identity():
    model = Tiny()
    names = lambda t: [n for n, _ in select_modules(model, t)]
    assert names(model.blocks[1]) == ["blocks.1"]
    assert names([model.head, model.blocks[0].ln, "emb"]) == ["emb", "blocks.0.ln", "head"]
    assert names(model.blocks) == ["blocks.0", "blocks.1", "blocks.2"]  # a ModuleList: its members
    assert names(model) == [""]
    net = nn.Sequential(nn.Linear(4, 4), Exploding(), nn.Linear(4, 4))
    assert names_of(net, net[1]) == ["1"]
    with pytest.raises(ValueError, match=r"Tiny: the Linear module given as a target is not a submodule"):
        select_modules(model, nn.Linear(16, 16))
    with pytest.raises(ValueError, match=r"the Block module given as a target is not a submodule"):
        select_modules(model, ["head", Tiny().blocks[0]])  # a module of another model, in a list
    # measuring through a module object equals measuring through its name
    torch.manual_seed(0)
    x = torch.randint(0, 50, (3, 7))
    model.eval()
    with attach(model, model.blocks[2], precision="float64") as by_obj, torch.no_grad():
        model(x)
    with attach(model, "blocks.2", precision="float64") as by_name, torch.no_grad():
        model(x)
    assert list(by_obj.accumulators) == ["blocks.2"]
    torch.testing.assert_close(by_obj.compute()["blocks.2"].values, by_name.compute()["blocks.2"].values, rtol=0, atol=0)


def names_of(model, target):
    return [n for n, _ in select_modules(model, target)]


def test_pick_errors_name_the_module_and_the_root_module_is_named_readably():
    model = nn.Sequential(TupleOut())
    with attach(model, "0", pick=5):
        with pytest.raises(IndexError, match=r"^0: pick=5 is out of range: the module returns a tuple of 2 element"):
            model(torch.randn(3, 4))
    with attach(model, "0", pick=1):
        with pytest.raises(TypeError, match=r"^0: module output is dict, expected a tensor$"):
            model(torch.randn(3, 4))
    with attach(model, "0", pick=lambda out: out[1]):
        with pytest.raises(TypeError, match=r"^0: module output is dict"):
            model(torch.randn(3, 4))
    root = TupleOut()
    with attach(root, ""):
        with pytest.raises(TypeError, match=r"^<root: TupleOut>: module output is tuple, expected a tensor \(pass pick=0"):
            root(torch.randn(3, 4))


def test_a_hugging_face_model_output_takes_int_and_str_picks():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 64, (2, 5))
    with attach(model, ""), torch.no_grad():  # the hint names the fields and pick=0
        with pytest.raises(TypeError, match=r"^<root: GPT2LMHeadModel>: module output is CausalLMOutput\w*, expected a "
                                            r"tensor \(pass pick='key' with one of its keys \['logits'.*pick=0"):
            model(ids, use_cache=False)
    with attach(model, "", pick=0) as by_index, attach(model, "", pick="logits") as by_key, torch.no_grad():
        model(ids, use_cache=False)
    assert by_index.accumulators[""].n_rows == by_key.accumulators[""].n_rows == 10
    torch.testing.assert_close(by_index.compute()[""].values, by_key.compute()[""].values, rtol=0, atol=0)
    with attach(model, "", pick=3), torch.no_grad():
        with pytest.raises(IndexError, match=r"pick=3 is out of range: .* of 1 element\(s\) \(fields \['logits'\]\)"):
            model(ids, use_cache=False)
    with attach(model, "", pick="hidden_states"), torch.no_grad():
        with pytest.raises(KeyError, match=r"pick='hidden_states' is not a key .*its keys: \['logits'\]"):
            model(ids, use_cache=False)


def _cov_eigs(rows: torch.Tensor) -> np.ndarray:
    x = rows.double().reshape(-1, rows.shape[-1]).numpy()
    return np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False)))[::-1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_capture_under_inference_mode_then_outside_it(dtype):
    """A pass under torch.inference_mode() must not break later measurements outside it: the CPU
    update's per-thread scratch and the accumulator's recycled buffers were created as inference
    tensors, and the next update outside inference mode wrote into them in place (RuntimeError
    'Inplace update to inference tensor outside InferenceMode'), in the same accumulator and in a
    fresh one of the same row shape."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(5, 6)).to(dtype)
    xs = [torch.randn(24, 5, dtype=dtype) * 3 + 1 for _ in range(4)]
    true = [model(x).detach() for x in xs]
    with attach(model, "0") as cap:  # one accumulator, passes in and out of inference mode
        for i, x in enumerate(xs):
            with torch.inference_mode() if i % 2 == 0 else torch.no_grad():
                model(x)
    with attach(model, "0") as fresh, torch.no_grad():  # a fresh one after the inference passes
        for x in xs:
            model(x)
    want = _cov_eigs(torch.cat(true))
    for c in (cap, fresh):
        got = c.compute()["0"]
        assert got.n_rows == 96
        np.testing.assert_allclose(got.values.double().numpy(), want, rtol=1e-4, atol=1e-6 * want[0])
    # and the state stays usable in place afterwards, under either mode
    acc = cap.accumulators["0"]
    acc.update(true[0])
    with torch.inference_mode():
        acc.update(true[1])
    assert acc.n_rows == 144


def test_a_module_list_inside_a_target_list_stands_for_its_members():
    """docs: an nn.ModuleList stands for its members, and a list of targets is their union. Inside a
    list, the ModuleList used to be matched as itself: a container whose forward never runs, so its
    accumulator stayed empty and compute() failed ('need at least 2 rows, have 0') after the pass."""
    model = Tiny()
    names = lambda t: [n for n, _ in select_modules(model, t)]
    members = ["blocks.0", "blocks.1", "blocks.2"]
    assert names([model.blocks, "head"]) == members + ["head"]
    assert names((model.blocks, model.emb)) == ["emb"] + members
    assert names([nn.ModuleList([model.head, model.blocks[0]])]) == ["blocks.0", "head"]
    torch.manual_seed(0)
    model.eval()
    x = torch.randint(0, 50, (3, 7))
    with attach(model, [model.blocks, "head"], precision="float64") as cap, torch.no_grad():
        model(x)
    assert all(s.n_rows == 21 for s in cap.compute().values())


def test_rows_of_a_module_called_several_times_and_of_outputs_modified_in_place_later():
    """A shared module contributes the rows of every call (as documented); a hooked output that the
    next module modifies in place (ReLU(inplace=True)) is measured as it was at hook time. Both
    against float64 references of the module's true outputs."""

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(6, 6)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.lin(self.act(self.lin(x)))  # lin twice; its first output is clamped in place

    torch.manual_seed(3)
    model = Shared()
    true: list[torch.Tensor] = []
    spy = model.lin.register_forward_hook(lambda m, a, out: true.append(out.detach().clone()))
    with attach(model, "lin", precision="float64") as cap, torch.no_grad():
        for _ in range(3):
            model(torch.randn(40, 6) * 2 + 1)
    spy.remove()
    got = cap.compute()["lin"]
    assert got.n_rows == 240 and len(true) == 6
    assert any(bool((t < 0).any()) for t in true[0::2])  # the in-place ReLU did change those outputs
    want = _cov_eigs(torch.cat(true))
    np.testing.assert_allclose(got.values.numpy(), want, rtol=1e-9, atol=1e-12 * want[0])


def test_a_glob_never_selects_the_root():
    """`attach(model, "*")` also hooked the model itself (its name "" matched `[^.]*`): on a
    Sequential it measured the model's output as a layer, on a Hugging Face model it failed at the first
    forward (a ModelOutput without pick). The root is selected only by the exact target ""."""
    import spectral_lens as sl
    from spectral_lens.capture import select_modules

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    assert [n for n, _ in select_modules(model, "*")] == ["0", "1"]
    assert [n for n, _ in select_modules(model, "**")] == ["0", "1"]
    assert [n for n, _ in select_modules(model, "")] == [""]
    with sl.attach(model, "*") as capture:
        with torch.no_grad():
            model(torch.randn(8, 4))
    assert sorted(capture.accumulators) == ["0", "1"]


def test_a_module_dict_stands_for_its_members():
    """An nn.ModuleDict target (no forward of its own) was hooked as itself and its accumulator stayed
    empty; like an nn.ModuleList it now stands for its members."""
    import spectral_lens as sl
    from spectral_lens.capture import select_modules

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 3), "b": torch.nn.Linear(4, 5)})

        def forward(self, x):
            return self.heads["a"](x), self.heads["b"](x)

    model = Net()
    assert [n for n, _ in select_modules(model, model.heads)] == ["heads.a", "heads.b"]
    with sl.attach(model, [model.heads]) as capture, torch.no_grad():
        model(torch.randn(6, 4))
    assert {k: v.n_rows for k, v in capture.compute().items()} == {"heads.a": 6, "heads.b": 6}


def test_a_bad_pick_is_refused_when_attaching_and_a_callable_pick_builds_no_graph():
    """pick=True was taken as index 1 (a bool is an int) and a float pick failed only at the first
    forward; a callable pick ran with grad enabled and built an autograd graph per call."""
    import spectral_lens as sl

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    for bad in (True, 1.0, [0]):
        with pytest.raises(TypeError, match="pick must be None, an int index, a str key or a callable"):
            sl.attach(model, "0", pick=bad)
        with pytest.raises(TypeError, match="pick must be"):
            sl.ActivationCovarianceAccumulator().attach(model, "0", pick=bad)
    seen = []

    def pick(out):
        y = out * 2.0
        seen.append(y.requires_grad)
        return y

    with sl.attach(model, "0", pick=pick) as capture:
        model(torch.randn(5, 4))  # a training-style forward: grad enabled
    assert seen == [False] and capture.compute()["0"].n_rows == 5


def test_a_name_without_its_prefix_is_named_in_the_error():
    """Followed as a new user on a config-built GPT-2: ``sl.attach(model, "h.1")`` (the block name without
    ``transformer.``) listed 'some module names', the model's first eight (``transformer``,
    ``transformer.wte``, ...), since difflib ranks the short name far from the long one; the error now names
    the modules whose names end in the target first, for names and globs, also through ``SpectralLens``."""
    import spectral_lens as sl

    model = nn.ModuleDict({"transformer": nn.ModuleDict({"wte": nn.Embedding(10, 4), "wpe": nn.Embedding(10, 4),
                                                        "drop": nn.Dropout(0.0), "ln": nn.LayerNorm(4),
                                                        "h": nn.ModuleList(Block(4) for _ in range(3))})})
    with pytest.raises(ValueError, match=re.escape("no module matches target 'h.1'; closest names: ['transformer.h.1'")):
        select_modules(model, "h.1")
    with pytest.raises(ValueError, match=re.escape("closest names: ['transformer.h.0.mlp', 'transformer.h.1.mlp', "
                                                   "'transformer.h.2.mlp'")):
        attach(model, "h.*.mlp")
    with pytest.raises(ValueError, match=re.escape("SpectralLens layers='h.2': ModuleDict: no module matches target "
                                                   "'h.2'; closest names: ['transformer.h.2'")):
        sl.SpectralLens(model, [torch.zeros(2, 3)], layers="h.2", params=())
