"""Module outputs that are not rows of ``(..., d)``: channels-first outputs of convolutions, pooling,
batch/instance/group norms and upsampling (and blocks ending in one) are refused with the ``pick=``
that measures them, never read silently along the wrong axis; channels-last modules (Linear,
LayerNorm, Embedding, Hugging Face's ``Conv1D``, a block that transposes back) are read as before.
Tuple outputs of RNNs, ``nn.TransformerEncoder`` padding, and per-sample gradients of conv and RNN
weights, against float64 references."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spectral_lens as sl
from support.data import cov_eigs
from spectral_lens import PerSampleGradientProbe, SpectralLens

TOL = 1e-10


def check_spectrum(spec, rows: torch.Tensor) -> None:
    ref = cov_eigs(rows)
    assert spec.n_rows == rows.numel() // rows.shape[-1] and spec.dim == rows.shape[-1]
    assert np.abs(spec.values.numpy() - ref).max() <= TOL * ref[0]


def output_of(model: nn.Module, name: str, x) -> torch.Tensor:
    """The output of ``model``'s module ``name`` on ``x``, through a hook of the test's own."""
    got = {}
    h = model.get_submodule(name).register_forward_hook(lambda m, a, o: got.setdefault("o", o))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    return got["o"]


# (module, input shape, dim of the channels in the output)
CHANNELS_FIRST = [
    (lambda: nn.Conv1d(3, 5, 3), (2, 3, 9), 1),
    (lambda: nn.Conv1d(3, 5, 3), (3, 9), 0),  # unbatched (C, L)
    (lambda: nn.Conv2d(3, 5, 3), (2, 3, 10, 12), 1),
    (lambda: nn.Conv3d(2, 5, 2), (2, 2, 4, 4, 7), 1),
    (lambda: nn.ConvTranspose1d(3, 5, 2), (2, 3, 7), 1),
    (lambda: nn.ConvTranspose2d(3, 5, 2), (2, 3, 6, 6), 1),
    (lambda: nn.BatchNorm1d(5), (4, 5, 7), 1),
    (lambda: nn.BatchNorm2d(5), (2, 5, 6, 7), 1),
    (lambda: nn.BatchNorm3d(5), (2, 5, 3, 4, 6), 1),
    (lambda: nn.InstanceNorm1d(5), (2, 5, 8), 1),
    (lambda: nn.InstanceNorm2d(5, affine=True), (2, 5, 6, 7), 1),
    (lambda: nn.GroupNorm(1, 5), (2, 5, 6, 7), 1),
    (lambda: nn.LocalResponseNorm(2), (2, 5, 6, 7), 1),
    (lambda: nn.MaxPool1d(2), (2, 5, 8), 1),
    (lambda: nn.MaxPool2d(2), (2, 5, 6, 8), 1),
    (lambda: nn.AvgPool2d(2), (2, 5, 6, 8), 1),
    (lambda: nn.AdaptiveAvgPool2d(1), (2, 5, 6, 8), 1),
    (lambda: nn.Upsample(scale_factor=2), (2, 5, 4, 6), 1),
    (lambda: nn.PixelShuffle(2), (2, 8, 3, 5), 1),
    (lambda: nn.ZeroPad2d(1), (2, 5, 6, 7), 1),  # EfficientNet's depthwise-conv padding
    (lambda: nn.ConstantPad1d((0, 2), 0.0), (2, 5, 6), 1),
    (lambda: nn.ReflectionPad2d(1), (5, 6, 7), 0),
    (lambda: nn.ReplicationPad3d(1), (2, 3, 4, 4, 5), 1),
    (lambda: nn.CircularPad1d(1), (2, 5, 6), 1),
]


@pytest.mark.parametrize("make, shape, channel_dim", CHANNELS_FIRST,
                         ids=[f"{type(m()).__name__}-{'x'.join(map(str, s))}" for m, s, _ in CHANNELS_FIRST])
def test_a_channels_first_output_is_refused_with_the_pick_that_measures_it(make, shape, channel_dim):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64)
    cases = [(nn.Sequential(make()).double().eval(), "0")]
    if any(hasattr(make(), a) for a in ("out_channels", "num_features", "num_channels")):
        cases.append((nn.Sequential(make(), nn.ReLU()).double().eval(), ""))  # a container ending in one
    for model, name in cases:
        pattern = rf"channels-first.*at dim {channel_dim}.*pick=lambda out: out\.movedim\({channel_dim}, -1\)"
        with sl.attach(model, name) as cap, pytest.raises(TypeError, match=pattern):
            model(x)
        assert cap.accumulators[name].n_rows == 0
        assert not model[0]._forward_hooks and not model._forward_hooks  # the with block removed them
        # the pick the error names measures rows of channels, as a float64 reference reads them
        pick = lambda out: out.movedim(channel_dim, -1)
        with sl.attach(model, name, pick=pick, precision="float64") as cap:
            model(x)
        check_spectrum(cap.accumulators[name].compute(), pick(output_of(model, name, x)))


def test_the_reported_case_conv2d_is_no_longer_read_as_rows_of_its_width():
    model = nn.Sequential(nn.Conv2d(3, 8, 3))
    with sl.attach(model, "0") as cap, pytest.raises(TypeError) as err:
        model(torch.randn(2, 3, 10, 12))
    msg = str(err.value)
    assert "0: the module output is channels-first, shape (2, 8, 8, 10) with 8 channels at dim 1" in msg
    assert "(128 rows of width 10" in msg and "pick=lambda out: out.movedim(1, -1) (160 rows of 8 channels" in msg
    assert cap.accumulators["0"].n_rows == 0
    acc = sl.ActivationCovarianceAccumulator()  # an accumulator's own attach hooks the same way
    with acc.attach(model, "0"), pytest.raises(TypeError, match=r"movedim\(1, -1\)"):
        model(torch.randn(2, 3, 10, 12))
    with acc.attach(model, "0", pick=lambda out: out.movedim(1, -1)):
        model(torch.randn(2, 3, 10, 12))
    assert acc.n_rows == 160 and acc.dim == 8


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_under_fullgraph_compile_the_refusal_is_our_type_error_and_the_pick_measures(backend):
    """The refusal reaches a ``torch.compile(fullgraph=True)`` user as our ``TypeError`` (it was raised while
    tracing, so Dynamo reported it as an "Observed exception" with our text in its debug context)."""
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    model = model.double()
    with sl.attach(model, "0") as cap:
        with pytest.raises(TypeError, match=r"channels-first, shape \(2, 8, 4, 5\).*movedim\(1, -1\)"):
            torch.compile(model, fullgraph=True, backend=backend)(x)
        assert cap.accumulators["0"].n_rows == 0
    pick = lambda out: out.movedim(1, -1)
    torch._dynamo.reset()
    with sl.attach(model, "0", pick=pick, precision="float64") as cap:
        torch.compile(model, fullgraph=True, backend=backend)(x)
    check_spectrum(cap.accumulators["0"].compute(), pick(output_of(model, "0", x)))


class ResBlock(nn.Module):
    """A ResNet basic block: its forward ends in a residual ReLU, its last registered module is a BatchNorm2d."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNet(nn.Module):
    def __init__(self, c: int = 6, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.layer1 = nn.Sequential(ResBlock(c), ResBlock(c))
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(self.pool(self.layer1(self.stem(x))).flatten(1))


def ce(out, batch):
    return F.cross_entropy(out, batch[1], reduction="none")


def test_resnet_blocks_and_stages_refused_and_the_classifier_read_as_it_is():
    torch.manual_seed(0)
    model = ResNet().double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    for name in ("stem", "layer1", "layer1.1", "pool"):
        with sl.attach(model, name) as cap, pytest.raises(TypeError, match=rf"^{name}: .*channels-first.*movedim\(1, -1\)"):
            model(x)
    with sl.attach(model, ["fc", ""], precision="float64") as cap:  # (N, classes): rows already
        logits = model(x)
    check_spectrum(cap.accumulators[""].compute(), logits)
    check_spectrum(cap.accumulators["fc"].compute(), logits)


def test_spectral_lens_on_a_cnn_names_layers_and_pick_and_then_measures_rows_of_channels():
    torch.manual_seed(0)
    model = ResNet().double().eval()
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    with pytest.raises(TypeError, match=r"layer1\.1: .*channels-first.*movedim\(1, -1\).*SpectralLens chose this "
                                        r"block itself.*pass layers="):
        SpectralLens(model, pool=[(x, y)], params=()).measure(0, 0)
    assert not any(m._forward_hooks for m in model.modules())
    pick = lambda out: out.movedim(1, -1)
    probe = PerSampleGradientProbe(model, "fc.weight", loss_fn=ce)
    m = SpectralLens(model, pool=[(x, y)], layers="layer1.1", pick=pick, probe=probe, precision="float64").measure(0, 0)
    check_spectrum(m.spectra["act:layer1.1"], pick(output_of(model, "layer1.1", x)))
    assert m.spectra["grad:fc.weight"].n_rows == 4


def test_padding_mask_of_a_dict_batch_selects_positions_of_a_channels_first_conv():
    """A same-padded Conv1d over tokens: with pick=movedim the output is (N, T, C), and the default
    mask_fn's (N, T) attention mask selects its real positions."""
    torch.manual_seed(0)

    class TokenConv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.conv = nn.Embedding(20, 6), nn.Conv1d(6, 4, 3, padding=1)

        def forward(self, input_ids, attention_mask=None):
            return self.conv(self.emb(input_ids).transpose(1, 2))

    model = TokenConv().double().eval()
    ids, mask = torch.randint(0, 20, (3, 7)), torch.ones(3, 7, dtype=torch.long)
    mask[0, 4:], mask[2, 2:] = 0, 0
    pick = lambda out: out.movedim(1, -1)
    lens = SpectralLens(model, pool=[{"input_ids": ids, "attention_mask": mask}], layers="conv", pick=pick,
                        params=(), precision="float64")
    spec = lens.measure(0, 0).spectra["act:conv"]
    rows = pick(output_of(model, "conv", ids))[mask.bool()]
    check_spectrum(spec, rows)
    assert spec.n_rows == int(mask.sum())
    with pytest.raises(TypeError, match=r"conv: .*channels-first"):  # without the pick: refused, not mis-read
        SpectralLens(model, pool=[{"input_ids": ids, "attention_mask": mask}], layers="conv", params=()).measure(0, 0)


class MambaLike(nn.Module):
    """A block whose last registered module is a depthwise causal Conv1d but whose output is channels-last."""

    def __init__(self, d: int = 4, inner: int = 8) -> None:
        super().__init__()
        self.in_proj, self.out_proj = nn.Linear(d, inner), nn.Linear(inner, d)
        self.conv1d = nn.Conv1d(inner, inner, 3, groups=inner, padding=2)

    def forward(self, x):  # (N, L, d) -> (N, L, d)
        h = self.conv1d(self.in_proj(x).transpose(1, 2))[..., : x.shape[1]]
        return self.out_proj(F.silu(h.transpose(1, 2)))


class PatchEmbed(nn.Module):
    """ViT patch embedding: Conv2d, then flattened and transposed to (N, patches, D)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.proj, self.norm = nn.Conv2d(3, d, 4, stride=4), nn.Identity()

    def forward(self, x):
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


def hf_conv1d():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D
    return Conv1D(5, 3), torch.randn(2, 4, 3)


CHANNELS_LAST = [
    ("linear", lambda: (nn.Linear(3, 5), torch.randn(2, 4, 3))),
    ("layernorm", lambda: (nn.LayerNorm(5), torch.randn(2, 4, 5))),
    ("embedding", lambda: (nn.Embedding(9, 5), torch.randint(0, 9, (2, 6)))),
    ("hf-conv1d", hf_conv1d),
    ("batchnorm1d-2d-input", lambda: (nn.BatchNorm1d(5), torch.randn(6, 5))),
    ("groupnorm-2d-input", lambda: (nn.GroupNorm(1, 5), torch.randn(6, 5))),
    ("mamba-like-block", lambda: (MambaLike(), torch.randn(2, 6, 4))),
    ("mamba-like-block-width-eq-channels", lambda: (MambaLike(d=8, inner=8), torch.randn(2, 8, 8))),
    ("patch-embed", lambda: (PatchEmbed(), torch.randn(2, 3, 8, 12))),
    ("conv-then-flatten", lambda: (nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten()), torch.randn(4, 3, 4, 4))),
]


@pytest.mark.parametrize("make", [m for _, m in CHANNELS_LAST], ids=[n for n, _ in CHANNELS_LAST])
def test_channels_last_modules_are_read_as_they_are(make):
    torch.manual_seed(0)
    module, x = make()
    if x.is_floating_point():
        x = x.double()
    model = nn.Sequential(module).double().eval()
    with sl.attach(model, ["0", ""], precision="float64") as cap:
        out = model(x)
    for name in ("0", ""):
        check_spectrum(cap.accumulators[name].compute(), out)


class GatedByParameter(nn.Module):
    """MambaLike with its output projection a bare parameter: no Linear or LayerNorm of the output's width."""

    def __init__(self, d: int = 4, inner: int = 8) -> None:
        super().__init__()
        self.in_proj = nn.Linear(d, inner)
        self.w_out = nn.Parameter(torch.randn(inner, d) / inner**0.5)
        self.conv1d = nn.Conv1d(inner, inner, 3, groups=inner, padding=2)

    def forward(self, x):
        h = self.conv1d(self.in_proj(x).transpose(1, 2))[..., : x.shape[1]]
        return F.silu(h.transpose(1, 2)) @ self.w_out


def test_a_block_that_matches_the_shape_rule_by_chance_can_be_read_as_it_is_with_an_explicit_pick():
    """L = 8 = the conv's channels and width 4: dim 1 shows the conv's 8 channels and the last dim another
    size. MambaLike's out_proj has 4 features, the output's last size: read as it is (it was refused). A
    block with no Linear or LayerNorm of that width still looks channels-first; the error says how to read
    it as it is."""
    torch.manual_seed(0)
    x, x_ok = torch.randn(2, 8, 4, dtype=torch.float64), torch.randn(2, 9, 4, dtype=torch.float64)
    mamba = MambaLike(d=4, inner=8).double().eval()
    with sl.attach(mamba, "", precision="float64") as cap:
        out = mamba(x)
    check_spectrum(cap.accumulators[""].compute(), out)
    model = GatedByParameter(d=4, inner=8).double().eval()
    with sl.attach(model, "") as cap:
        model(x_ok)  # L = 9: read as it is
        with pytest.raises(TypeError, match=r"last module of known size is a channels-first Conv1d.*"
                                            r"pick=lambda out: out to read it"):
            model(x)
    with sl.attach(model, "", pick=lambda out: out, precision="float64") as cap:
        out = model(x)
    check_spectrum(cap.accumulators[""].compute(), out)


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_rnn_tuple_output_needs_pick_0_and_weight_gradients_match_a_float64_loop(kind):
    torch.manual_seed(0)

    class RNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = kind(3, 4, num_layers=2, batch_first=True), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    model = RNN().double().eval()
    x, y = torch.randn(5, 6, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    with sl.attach(model, "rnn") as cap, pytest.raises(TypeError, match=r"rnn: module output is tuple.*pick=0"):
        model(x)
    with sl.attach(model, "rnn", pick=0, precision="float64") as cap:
        model(x)
    check_spectrum(cap.accumulators["rnn"].compute(), model.rnn(x)[0])
    name = "rnn.weight_hh_l1"
    with pytest.warns(sl.EngineFallbackWarning, match=r"nn\.LSTM / nn\.GRU"):  # vmap cannot trace their kernels
        probe = PerSampleGradientProbe(model, name, loss_fn=ce).update((x, y))
    check_gradient(probe, model, name, x, y)


def check_gradient(probe, model, name, x, y) -> None:
    """The probe's squared singular values against a per-sample float64 autograd loop."""
    param = model.get_parameter(name)
    rows = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        rows.append(torch.autograd.grad(loss, param)[0].reshape(-1))
    ref = np.linalg.svd(torch.stack(rows).numpy(), compute_uv=False) ** 2
    spec = probe.compute()
    assert spec.n_rows == x.shape[0] and spec.dim == min(x.shape[0], param.numel())
    np.testing.assert_allclose(spec.values.numpy(), ref, rtol=TOL, atol=TOL * ref[0])


@pytest.mark.parametrize("name", ["stem.0.weight", "layer1.1.conv2.weight"])
def test_a_conv_weight_probe_measures_flattened_per_sample_gradients(name):
    """A 4-D conv weight's per-sample gradients are rows of all its entries: the spectrum of G G^T does
    not depend on how the weight is shaped."""
    torch.manual_seed(0)
    model = ResNet().double().eval()
    x, y = torch.randn(5, 3, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4])
    probe = PerSampleGradientProbe(model, name, loss_fn=ce).update((x, y))
    check_gradient(probe, model, name, x, y)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_transformer_encoder_padding_nested_output_names_the_padded_pick_and_mask():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    x = torch.randn(3, 6, 8)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[0, 4:], pad[1, 2:] = True, True
    pattern = r"layers\.1: .*nested tensor.*torch\.cat\(out\.unbind\(\)\).*to_padded_tensor\(0\.0, \(N, T, d\)\).*mask"
    with sl.attach(enc, "layers.1"), torch.no_grad(), pytest.raises(TypeError, match=pattern):
        enc(x, src_key_padding_mask=pad)
    pick = lambda out: out.to_padded_tensor(0.0, (3, 6, 8)) if out.is_nested else out
    with sl.attach(enc, "layers.1", pick=pick, precision="float64") as cap, torch.no_grad(), cap.mask(~pad):
        enc(x, src_key_padding_mask=pad)
    ref = enc.layers[1](enc.layers[0](x, src_key_padding_mask=pad), src_key_padding_mask=pad)[~pad]
    spec = cap.accumulators["layers.1"].compute()
    assert spec.n_rows == int((~pad).sum())
    assert np.abs(spec.values.numpy() - cov_eigs(ref)).max() <= 1e-5 * cov_eigs(ref)[0]  # float32 model
    # the other remedy the error names: the valid rows alone, for this strided layout too (whose values()
    # is its flat buffer: one row of every number, silently)
    rows = lambda out: torch.cat(out.unbind()) if out.is_nested else out[~pad]
    with sl.attach(enc, "layers.1", pick=rows, precision="float64") as cap, torch.no_grad():
        enc(x, src_key_padding_mask=pad)
    alone = cap.accumulators["layers.1"].compute()
    assert alone.n_rows == int((~pad).sum())
    assert np.abs(alone.values.numpy() - cov_eigs(ref)).max() <= 1e-5 * cov_eigs(ref)[0]


def test_pooling_over_the_features_of_token_rows_can_be_read_as_it_is():
    """MaxPool1d on (N, T, d) pools the features: its layout cannot be told from the module, so the error
    also says how to read the output as it is; a conv (channels by definition) does not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.MaxPool1d(2)).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    with sl.attach(model, "0") as cap, pytest.raises(TypeError, match=r"pass pick=lambda out: out to read it as it is"):
        model(x)
    with sl.attach(model, "0", pick=lambda out: out, precision="float64") as cap:
        out = model(x)
    check_spectrum(cap.accumulators["0"].compute(), out)
    conv = nn.Sequential(nn.Conv1d(5, 5, 3))  # (a kernel-1 Conv1d may mix token positions: see the gMLP test)
    with sl.attach(conv, "0"), pytest.raises(TypeError) as err:
        conv(torch.randn(2, 5, 8))
    assert "read it as it is" not in str(err.value)


# --- blocks that end channels-first through modules the rule did not know (they were read silently as rows
# of their last spatial size), and channels-last blocks it must not refuse ---


def refused_then_measured(model: nn.Module, name: str, x, channel_dim: int = 1, what: str = "") -> None:
    """``attach(model, name)`` is refused at dim ``channel_dim`` with the pick that measures the channels
    (and the error names ``what``); that pick measures them as a float64 reference reads them."""
    where = re.escape(name or "<root: ")
    pattern = rf"^{where}.*: the module output{what}.* is channels-first.*at dim {channel_dim}.*movedim\({channel_dim}, -1\)"
    with sl.attach(model, name) as cap, torch.no_grad(), pytest.raises(TypeError, match=pattern):
        model(x)
    assert cap.accumulators[name].n_rows == 0 and not any(m._forward_hooks for m in model.modules())
    pick = lambda out: out.movedim(channel_dim, -1)
    with sl.attach(model, name, pick=pick, precision="float64") as cap, torch.no_grad():
        model(x)
    check_spectrum(cap.accumulators[name].compute(), pick(output_of(model, name, x)))


def read_as_it_is(model: nn.Module, name: str, x) -> None:
    with sl.attach(model, name, precision="float64") as cap, torch.no_grad():
        model(x)
    check_spectrum(cap.accumulators[name].compute(), output_of(model, name, x))


def test_hugging_face_convnext_blocks_stages_and_embeddings_are_refused():
    """ConvNeXt's block permutes to channels-last for its LayerNorm and Linears, then back: its last module
    of known size is a Linear (pwconv2) whose C features the output holds at dim 1. The embeddings end in a
    ``ConvNextLayerNorm(data_format="channels_first")``. All were read as rows of W; the channels-last
    modules inside the block (its LayerNorm, its Linears: (N, H, W, C)) are read as they are."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 2], num_stages=2,
                                      patch_size=2)
    model = transformers.ConvNextModel(cfg).double().eval()
    x = torch.randn(2, 3, 16, 20, dtype=torch.float64)  # stage 1: (2, 16, 4, 5)
    for name, what in (("embeddings.layernorm", ""), ("embeddings", ".*ConvNextLayerNorm"),
                       ("encoder.stages.1.layers.1", r".*Linear of 16 features"), ("encoder.stages.1", "")):
        refused_then_measured(model, name, x, what=what)
    for name in ("encoder.stages.1.layers.1.layernorm", "encoder.stages.1.layers.1.pwconv1",
                 "encoder.stages.1.layers.1.pwconv2"):
        read_as_it_is(model, name, x)
    with pytest.raises(TypeError, match=r"encoder\.stages\.1\S*: .*SpectralLens chose this block itself"):
        SpectralLens(model, pool=[x], params=()).measure(0, 0)


@pytest.mark.parametrize("arch", ["Wav2Vec2", "Hubert"])
def test_a_speech_feature_encoder_with_layer_norm_is_refused(arch):
    """``feat_extract_norm="layer"``: each conv layer is Conv1d, then transpose, LayerNorm, transpose back,
    activation. Its last module of known size is the LayerNorm: the (N, C, L) output was read as rows of
    L. The feature projection after it ((N, L, hidden), LayerNorm then Linear) is read as it is."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{arch}Config")(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
        conv_kernel=(4, 3), conv_stride=(2, 2), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer")
    model = getattr(transformers, f"{arch}Model")(cfg).double().eval()
    x = torch.randn(2, 200, dtype=torch.float64)  # conv layers: (2, 8, 99), (2, 8, 49)
    for name in ("feature_extractor.conv_layers.0", "feature_extractor.conv_layers.1", "feature_extractor"):
        refused_then_measured(model, name, x, what=".*LayerNorm of 8 features")
    first = lambda out: out[0] if isinstance(out, tuple) else out  # Wav2Vec2's: (hidden, normed features)
    with sl.attach(model, "feature_projection", pick=first, precision="float64") as cap, torch.no_grad():
        model(x)
    check_spectrum(cap.accumulators["feature_projection"].compute(), first(output_of(model, "feature_projection", x)))
    read_as_it_is(model, "encoder.layers.0", x)


def test_hugging_face_resnet_embedder_ending_in_max_pooling_is_refused():
    """ResNetEmbeddings is a conv layer then MaxPool2d, which knows no channel count: the rule stopped there
    and read the (N, C, H/4, W/4) output as rows of W/4; it now takes the count from the BatchNorm before."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    model = transformers.ResNetModel(cfg).double().eval()
    x = torch.randn(2, 3, 32, 40, dtype=torch.float64)
    refused_then_measured(model, "embedder", x, what=".*channels-first BatchNorm2d")
    for name in ("encoder.stages.1", "encoder.stages.1.layers.0"):  # refused before, and still
        refused_then_measured(model, name, x)


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class Snake(nn.Module):
    """A learnable activation (one alpha per channel), as audio codecs use."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, c, 1, 1))

    def forward(self, x):
        return x + torch.sin(self.alpha * x) ** 2 / self.alpha


class Permute(nn.Module):
    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: an nn.LayerNorm over the channels of (N, C, H, W)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    """torchvision's ConvNeXt block: its Sequential ends in a Permute module back to channels first."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(c, c, 7, padding=3, groups=c), Permute(0, 2, 3, 1), nn.LayerNorm(c),
                                   nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c), Permute(0, 3, 1, 2))

    def forward(self, x):
        return x + self.block(x)


# (model, input shape, names refused, names read as they are)
CUSTOM_CHANNELS_FIRST = [
    ("conv-custom-activation", lambda: nn.Sequential(nn.Conv2d(3, 6, 3), Swish()), (2, 3, 9, 11), [""], []),
    ("conv-learnable-activation", lambda: nn.Sequential(nn.Conv2d(3, 6, 3), Snake(6)), (2, 3, 9, 11), [""], []),
    ("conv-pool-custom-activation", lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), Swish(),
                                                          nn.MaxPool2d(2)), (2, 3, 9, 11), [""], []),
    ("torchvision-cnblock", lambda: nn.Sequential(CNBlock()), (2, 6, 5, 9), ["0", "0.block", ""],
     ["0.block.2", "0.block.5"]),
    ("timm-layernorm2d", lambda: nn.Sequential(nn.Conv2d(3, 6, 1), LayerNorm2d(6)), (2, 3, 5, 9), ["1", ""], []),
]


@pytest.mark.parametrize("make, shape, refused, read", [c[1:] for c in CUSTOM_CHANNELS_FIRST],
                         ids=[c[0] for c in CUSTOM_CHANNELS_FIRST])
def test_blocks_ending_channels_first_through_custom_modules_are_refused(make, shape, refused, read):
    """A conv followed by activations the rule does not know (parameterless or learnable), a Sequential
    ending in a Permute module back to channels first, a LayerNorm subclass that permutes: the rule skips
    modules of unknown size and checks the output's shape against the last module of known size."""
    torch.manual_seed(0)
    model = make().double().eval()
    x = torch.randn(*shape, dtype=torch.float64)
    for name in refused:
        refused_then_measured(model, name, x)
    for name in read:
        read_as_it_is(model, name, x)


class SpatialGatingUnit(nn.Module):
    """gMLP's spatial gating (lucidrains' g-mlp-pytorch): LayerNorm over half the features, then a kernel-1
    Conv1d over the SEQUENCE axis (the T positions are its channels); the output (B, T, d/2) is features
    last. ``linear``: timm's version, an nn.Linear(T, T) over the transposed gate."""

    def __init__(self, d: int, seq_len: int, linear: bool = False) -> None:
        super().__init__()
        self.linear = linear
        self.norm = nn.LayerNorm(d // 2)
        self.proj = nn.Linear(seq_len, seq_len) if linear else nn.Conv1d(seq_len, seq_len, 1)

    def forward(self, x):
        u, v = x.chunk(2, dim=-1)
        v = self.norm(v)
        v = self.proj(v.transpose(1, 2)).transpose(1, 2) if self.linear else self.proj(v)
        return u * v


class GMLPBlock(nn.Module):
    def __init__(self, d: int = 8, ff: int = 16, seq_len: int = 6, linear: bool = False) -> None:
        super().__init__()
        self.proj_in, self.act = nn.Linear(d, ff), nn.GELU()
        self.sgu = SpatialGatingUnit(ff, seq_len, linear)
        self.proj_out = nn.Linear(ff // 2, d)

    def forward(self, x):
        return x + self.proj_out(self.sgu(self.act(self.proj_in(x))))


def test_gmlp_spatial_gating_is_read_as_rows_of_features_and_its_token_conv_error_offers_that():
    """The spatial gating unit's output (B, T, d/2) held the conv's T channels at dim 1 and another size
    last, so it was refused as channels-first; its last size is its LayerNorm's width: features last, read
    as it is. Its Conv1d alone, output (B, T, d/2) with positions as channels, is still refused (the rule
    cannot tell), and the error now offers reading it as it is (it did not, a conv being channels by
    definition; a kernel-1 Conv1d is what gMLP and MLP-Mixer mix positions with)."""
    torch.manual_seed(0)
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    model = GMLPBlock().double().eval()
    for name in ("sgu", "", "proj_out"):
        read_as_it_is(model, name, x)
    with sl.attach(model, "sgu.proj"), pytest.raises(TypeError, match=r"sgu\.proj: .*channels-first, shape \(3, 6, 8\)"
                                                                     r".*pick=lambda out: out to read it as it is"):
        model(x)
    with sl.attach(model, "sgu.proj", pick=lambda out: out, precision="float64") as cap:
        model(x)
    check_spectrum(cap.accumulators["sgu.proj"].compute(), output_of(model, "sgu.proj", x))
    timm_style = GMLPBlock(linear=True).double().eval()  # Linear(T, T): channels-last, and (B, T, d/2) out
    for name in ("sgu", "sgu.proj", ""):
        read_as_it_is(timm_style, name, x)


class MyLinear(nn.Linear):
    pass


CHANNELS_LAST_GUARDS = [  # blocks and Linear/LayerNorm subclasses the new shape checks must not refuse
    ("linear-subclass", lambda: nn.Sequential(MyLinear(8, 6)), (2, 6, 8)),
    ("linear-subclass-t-eq-width", lambda: nn.Sequential(MyLinear(8, 6), nn.ReLU()), (2, 6, 5, 8)),
    ("conv-then-permute-to-channels-last", lambda: nn.Sequential(nn.Conv2d(3, 6, 1), Swish(), Permute(0, 2, 3, 1)),
     (2, 3, 6, 5)),
    ("mlp-block-norm-last", lambda: nn.Sequential(nn.Linear(8, 6), nn.GELU(), nn.Linear(6, 8), nn.LayerNorm(8)),
     (2, 8, 8)),
]


@pytest.mark.parametrize("make, shape", [c[1:] for c in CHANNELS_LAST_GUARDS], ids=[c[0] for c in CHANNELS_LAST_GUARDS])
def test_channels_last_blocks_and_linear_subclasses_are_read_as_they_are(make, shape):
    """Not failures of the old rule (it ignored these): guards for the new checks of blocks ending in a
    Linear or LayerNorm, of Linear subclasses, and of modules of unknown size skipped."""
    torch.manual_seed(0)
    model = make().double().eval()
    x = torch.randn(*shape, dtype=torch.float64)
    read_as_it_is(model, "", x)


def test_a_block_with_hugging_face_conv1d_projections_is_read_as_features():
    """MambaLike with GPT-2's ``Conv1D`` (a Linear with a transposed weight) as its projections, at L = inner:
    the output's last size is the out projection's ``nf``, so it is features last (it was refused as
    channels-first: the Conv1D's size was unknown)."""
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    class MambaLikeConv1D(MambaLike):
        def forward(self, x):
            h = self.conv1d(self.in_proj(x).transpose(1, 2))[..., : x.shape[1]]
            return self.out_proj(F.silu(h.transpose(1, 2)).contiguous())  # Conv1D views its input

    torch.manual_seed(0)
    model = MambaLikeConv1D(d=4, inner=8)
    model.in_proj, model.out_proj = Conv1D(8, 4), Conv1D(4, 8)  # Conv1D(nf=out, nx=in)
    model = model.double().eval()
    read_as_it_is(model, "", torch.randn(2, 8, 4, dtype=torch.float64))
