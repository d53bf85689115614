"""Every registered strategy runs on the one template of ``strategies/base.py``."""

import pytest

from fedsim.catalog import registries
from fedsim.strategies.base import FedSimStrategy

STRATEGIES = registries()["strategies"]


@pytest.mark.parametrize("name", STRATEGIES.names())
@pytest.mark.parametrize("method", ["configure_train", "aggregate_train", "collect", "record_failure"])
def test_strategy_fills_hooks_and_never_rewrites_the_template(name, method):
    cls = STRATEGIES.get(name)
    assert issubclass(cls, FedSimStrategy)
    assert getattr(cls, method) is getattr(FedSimStrategy, method), (
        f"{name} overrides {method}; express the algorithm with the hooks FedSimStrategy declares")


@pytest.mark.parametrize("hook", ["attach_server", "prepare_round", "train_config", "train_arrays", "train_records",
                                  "before_send", "min_replies", "aggregate", "train_metrics",
                                  "privacy_mechanisms", "state_dict", "load_state_dict", "sample", "sample_size"])
def test_base_declares_every_hook_the_loop_uses(hook):
    assert callable(getattr(FedSimStrategy, hook))
