"""Module outputs that are not rows of ``(..., d)``: channels-first outputs of convolutions, pooling,
batch/instance/group norms and upsampling (and blocks ending in one) are refused with the ``pick=``
that measures them, never read silently along the wrong axis; channels-last modules (Linear,
LayerNorm, Embedding, Hugging Face's ``Conv1D``, a block that transposes back) are read as before.
Tuple outputs of RNNs, ``nn.TransformerEncoder`` padding, and per-sample gradients of conv and RNN
weights, against float64 references."""

from __future__ import annotations

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


def test_a_block_that_matches_the_shape_rule_by_chance_can_be_read_as_it_is_with_an_explicit_pick():
    """MambaLike with L = 8 = conv channels and width 4: dim 1 shows the conv's 8 channels and the last
    dim another size, so the output looks channels-first; the error says how to read it as it is."""
    torch.manual_seed(0)
    model = MambaLike(d=4, inner=8).double().eval()
    x = torch.randn(2, 8, 4, dtype=torch.float64)
    x_ok = torch.randn(2, 9, 4, dtype=torch.float64)
    with sl.attach(model, "") as cap:
        model(x_ok)  # L = 9: read as it is
        with pytest.raises(TypeError, match=r"last module is a channels-first Conv1d.*pick=lambda out: out to read it"):
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
    conv = nn.Sequential(nn.Conv1d(5, 5, 1))
    with sl.attach(conv, "0"), pytest.raises(TypeError) as err:
        conv(torch.randn(2, 5, 8))
    assert "read it as it is" not in str(err.value)
