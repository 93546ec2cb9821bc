"""Review 25 (zoo): the Newton-Schulz band stated in muon.py, for every singular value, against float64."""
import numpy as np
import pytest
import torch

from examples.nanogpt.muon import NS_COEFFICIENTS, newton_schulz5


def _five_steps(s):
    a, b, c = NS_COEFFICIENTS
    for _ in range(5):
        s = a * s + b * s**3 + c * s**5
    return s


def test_the_scalar_map_has_the_stated_ranges():
    x = np.linspace(0, 1, 1_000_001)[1:]
    y = _five_steps(x)
    assert y.max() == pytest.approx(1.2024, abs=1e-4)  # reached near sigma = 0.4% of ||G||_F
    big = y[x >= 0.01]
    assert big.min() == pytest.approx(0.6818, abs=1e-4) and big.max() == pytest.approx(1.1344, abs=1e-4)


@pytest.mark.parametrize("shape", [(256, 256), (512, 128), (96, 384)])
@pytest.mark.parametrize("dtype, slack", [(torch.float64, 1e-9), (torch.float32, 1e-5), (torch.bfloat16, 0.01)])
def test_every_singular_value_lies_in_the_maps_range(shape, dtype, slack):
    """A square Gaussian matrix has singular values far below 1% of its Frobenius norm: they leave
    [0.68, 1.13] (up to 1.20) but never the map's range; the float64 iteration's values are the map's."""
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    s = torch.linalg.svdvals(newton_schulz5(G, dtype=dtype).double())
    assert s.max() <= 1.2024 + slack
    if dtype == torch.float64:
        sv = torch.linalg.svdvals(G)
        want = torch.from_numpy(_five_steps((sv / (torch.linalg.matrix_norm(G) + 1e-7)).numpy()))
        torch.testing.assert_close(s.sort().values, want.sort().values, rtol=0, atol=1e-9)


@pytest.mark.slow  # ~4.5 s on the 2-core machine
@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon is missing")
def test_resume_with_torch_muon_is_bitwise(tmp_path):
    """The checkpoint carries torch.optim.Muon's momentum buffers too (the records' Muon: test_zoo_train)."""
    from examples.nanogpt.train import load_model, train

    kw = dict(variant="AttnScale", profile="tiny", data="pydoc", steps=4, batch_tier=2, val_tokens=1024, verbose=False,
              eval_every_tokens=10**9, save_final=True, muon_impl="torch", device="cpu")
    train(run_dir=tmp_path / "a", checkpoint_every_tokens=2048, **kw)
    train(run_dir=tmp_path / "b", resume=tmp_path / "a" / "ckpt_000002.pt", **kw)
    a, b = load_model(tmp_path / "a" / "ckpt_000004.pt"), load_model(tmp_path / "b" / "ckpt_000004.pt")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
