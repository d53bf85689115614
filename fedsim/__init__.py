"""fedsim: a federated and privacy-preserving learning simulator built on Flower and PyTorch.

The Python API (``fedsim.run``, ``fedsim.Run``, ``fedsim.load_scenario``, ``fedsim.Scenario``, the
``fedsim.register_*`` decorators, the typed errors) is exported lazily, through a module-level
``__getattr__`` (PEP 562): ``import fedsim`` imports none of Flower, PyTorch or pydantic.
"""

__version__ = "0.1.0"

#: exported name -> the module that defines it (imported on first access)
_EXPORTS = {
    "run": "fedsim.api", "Run": "fedsim.api", "load_run": "fedsim.api", "load_scenario": "fedsim.api",
    "register_strategy": "fedsim.api", "register_plugin": "fedsim.api", "register_model": "fedsim.api",
    "register_dataset": "fedsim.api", "register_partitioner": "fedsim.api",
    "MissingDependencyError": "fedsim.api",
    "Scenario": "fedsim.config",
    "FedSimError": "fedsim.errors", "ConfigError": "fedsim.errors", "FailedRoundError": "fedsim.errors",
    "PrivacyBudgetExceeded": "fedsim.errors", "RunDirectoryError": "fedsim.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedsim' has no attribute '{name}'")
    value = getattr(__import__(module, fromlist=[name]), name)  # importlib would cost an import
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list:
    return sorted({*globals(), *_EXPORTS})
