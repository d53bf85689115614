"""The linearly separable dataset (fedsim/data/separable.py) and its scenario with the step plugin."""

import numpy as np
import pytest

from fedsim.data.datasets import DATASETS
from fedsim.errors import ConfigError


def test_separable_data_has_the_margin_and_depends_only_on_the_seed():
    load = DATASETS.get("separable")
    d = load(3, 0.25, num_samples=500, dim=7, margin=0.2)
    again, other = load(3, 0.25, num_samples=500, dim=7, margin=0.2), load(4, 0.25, num_samples=500, dim=7)
    assert np.array_equal(d.x_train, again.x_train) and not np.array_equal(d.x_train[:5], other.x_train[:5])
    assert d.num_classes == 2 and d.input_shape == (7,) and d.x_train.dtype == np.float32
    assert len(d.y_train) + len(d.y_test) == 500 and set(np.unique(d.y_train)) == {0, 1}
    # some unit vector separates train and test with margin >= 0.2: least squares on the labels finds
    # a separating direction; check it separates, then check the generator's margin directly
    x = np.concatenate([d.x_train, d.x_test]).astype(np.float64)
    s = np.concatenate([d.y_train, d.y_test]) * 2.0 - 1.0
    w, *_ = np.linalg.lstsq(x, s, rcond=None)
    assert (np.sign(x @ w) == s).mean() > 0.95
    from fedsim.rng import numpy_rng

    w_star = numpy_rng(3, "dataset", "separable").normal(size=7)
    w_star /= np.linalg.norm(w_star)
    margins = s * (x @ w_star)
    assert margins.min() >= 0.2 - 1e-5


def test_separable_options_are_checked():
    with pytest.raises(ConfigError) as e:
        DATASETS.get("separable")(0, 0.2, margin=-1.0)
    assert e.value.key == "data.options.margin"
    with pytest.raises(ConfigError) as e:
        DATASETS.get("separable")(0, 0.2, dims=3)
    assert e.value.key == "data.options.dims"


@pytest.mark.slow
def test_separable_scenario_with_normalized_gd_and_gns_newton(tmp_path):
    from fedsim.config import load_scenario
    from fedsim.engines.local import run_local

    finals = {}
    for name in ("sgd", "normalized_gd", "gns_newton"):
        s = load_scenario("separable_logreg.toml", ["run.rounds=4", "run.progress=false",
                                                    'client.plugins=["step"]', f'client.step.transforms=["{name}"]'])
        summary = run_local(s, tmp_path / name)
        assert summary["status"] == "completed"
        finals[name] = summary["final"]
    assert finals["gns_newton"]["test_loss"] < finals["normalized_gd"]["test_loss"] < finals["sgd"]["test_loss"]
    assert finals["gns_newton"]["step/gns_newton.accepted"] >= 1
