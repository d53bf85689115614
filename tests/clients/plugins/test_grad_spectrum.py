"""grad_spectrum: nuclear norm and effective rank of layer-wise gradients (Li et al., 2025; spec
client-plugins.md §B.15)."""

import math

import pytest
import torch

from fedsim.clients import diagnostics as dg
from fedsim.clients.plugin_api import make_settings
from fedsim.clients.plugins.grad_spectrum import GradSpectrum, layer_spectra
from fedsim.errors import ConfigError
from tests.clients.plugins.probe_helpers import one_thread  # noqa: F401 - fixture
from tests.clients.plugins.probe_helpers import local_round, small_problem, weights

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_rank_one_gradient_has_effective_rank_one():
    gen = torch.Generator().manual_seed(0)
    g = torch.outer(torch.randn(7, generator=gen), torch.randn(5, generator=gen))
    nuclear, erank = dg.spectrum_stats(g)
    assert erank == pytest.approx(1.0, abs=1e-6)
    assert nuclear == pytest.approx(float(torch.linalg.matrix_norm(g, "fro")), rel=1e-6)  # one σ


@pytest.mark.parametrize("k", [1, 2, 4, 5])
def test_k_equal_singular_values_give_effective_rank_k(k):
    q1, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(k)))
    q2, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(k + 9)))
    g = q1[:, :k] @ (3.0 * torch.eye(k)) @ q2[:, :k].T
    nuclear, erank = dg.spectrum_stats(g)
    assert erank == pytest.approx(k, rel=1e-5)
    assert nuclear == pytest.approx(3.0 * k, rel=1e-5)


def test_effective_rank_is_scale_invariant_and_the_nuclear_norm_is_one_homogeneous():
    g = torch.randn(8, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    nuclear, erank = dg.spectrum_stats(g)
    for c in (1e-3, 0.5, 7.0, -2.0):
        scaled_nuclear, scaled_erank = dg.spectrum_stats(c * g)
        assert scaled_erank == pytest.approx(erank, rel=1e-9)
        assert scaled_nuclear == pytest.approx(abs(c) * nuclear, rel=1e-9)
    assert 1.0 < erank < 4.0
    p = torch.linalg.svdvals(g.double()) / torch.linalg.svdvals(g.double()).sum()
    assert erank == pytest.approx(math.exp(-float((p * p.log()).sum())), rel=1e-12)
    assert dg.spectrum_stats(torch.zeros(3, 3)) == (0.0, 0.0)


def test_layer_spectra_are_those_of_the_autograd_gradients():
    model, x, y = small_problem()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    got = layer_spectra(model, x, y)
    assert set(got) == {"0.weight", "2.weight"}  # biases are vectors, not matrices
    for name, p in model.named_parameters():
        if p.ndim == 2:
            s = torch.linalg.svdvals(p.grad.double())
            assert got[name][0] == pytest.approx(float(s.sum()), rel=1e-5)
            assert got[name][1] == pytest.approx(dg.effective_rank(s), rel=1e-5)


def test_a_convolution_kernel_is_read_as_an_out_by_rest_matrix():
    kernel = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    assert dg.spectrum_stats(kernel) == pytest.approx(dg.spectrum_stats(kernel.reshape(4, 12)))


def test_the_plugin_writes_per_layer_and_mean_metrics_without_changing_training():
    plain, _ = local_round([])
    probed, res = local_round([GradSpectrum()])
    assert weights(plain) == weights(probed)
    layers = [k for k in res.metrics if k.startswith("grad_spectrum/") and k.endswith("/erank")]
    assert len(layers) == 2
    mean = sum(res.metrics[k] for k in layers) / 2
    assert res.metrics["grad_spectrum/erank_mean"] == pytest.approx(mean)
    _, means_only = local_round([GradSpectrum(GradSpectrum.Settings(per_layer=False))])
    assert sorted(k for k in means_only.metrics if k.startswith("grad_spectrum/")) == [
        "grad_spectrum/erank_mean", "grad_spectrum/nuclear_mean"]
    _, skipped = local_round([GradSpectrum(GradSpectrum.Settings(every=2))], round=2)
    assert not any(k.startswith("grad_spectrum/") for k in skipped.metrics)


@pytest.mark.parametrize("key, value", [("every", 0), ("probe_size", 0)])
def test_bad_settings_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"client.grad_spectrum.{key}"):
        make_settings(GradSpectrum, {key: value})
