"""The ``npz`` dataset: the user's own arrays from a local ``.npz`` file.

Expected keys: ``x_train`` (numeric, shape ``(N, ...)``) and ``y_train`` (integer labels, shape
``(N,)``); optionally ``x_test`` and ``y_test`` together (else a stratified split is drawn), and
``natural_ids`` / ``natural_ids_test`` (owner id per sample, for the ``natural`` partitioner).
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from fedsim.data import _checks
from fedsim.data.datasets import OPTIONS_PREFIX, Dataset, register_dataset, split_train_test
from fedsim.errors import ConfigError, DataError
from fedsim.rng import numpy_rng

PATH_KEY = f"{OPTIONS_PREFIX}.path"
CLASSES_KEY = f"{OPTIONS_PREFIX}.num_classes"


def _read(path: str) -> dict[str, np.ndarray]:
    if not path:
        raise ConfigError(PATH_KEY, "the npz dataset needs a file", f'set {PATH_KEY} = "path/to/data.npz"')
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"{PATH_KEY}: no file at '{file}' (resolved from {Path.cwd()})",
                        f"check {PATH_KEY}; relative paths are resolved from the working directory")
    if not zipfile.is_zipfile(file):
        raise DataError(f"{PATH_KEY}: '{file}' is not a readable .npz file (not a zip archive)",
                        "write it with np.savez or np.savez_compressed")
    try:
        with np.load(file, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except ValueError as err:  # object arrays need pickle, which we refuse; or a corrupted .npy header
        raise DataError(f"{PATH_KEY}: '{file}' holds object arrays or an unreadable .npy member ({err})",
                        "save plain numeric arrays with np.savez(path, x_train=..., y_train=...)") from None
    except (OSError, zipfile.BadZipFile, EOFError, zlib.error) as err:
        raise DataError(f"{PATH_KEY}: '{file}' is not a readable .npz file ({err})",
                        "write it with np.savez or np.savez_compressed") from None
    stray = sorted(key for key, value in arrays.items() if not isinstance(value, np.ndarray))
    if stray:
        raise DataError(f"{PATH_KEY}: '{file}' has members that are not .npy arrays: {', '.join(stray)}",
                        "write it with np.savez or np.savez_compressed, arrays only")
    return arrays


def _features(arrays: dict, key: str, file: str) -> np.ndarray:
    x = arrays[key]
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool) or np.iscomplexobj(x):
        raise DataError(f"npz key '{key}' in '{file}' has dtype {x.dtype}, not real numbers",
                        f"store {key} as float32 (or any real numeric dtype)")
    if x.ndim < 2 or len(x) == 0 or 0 in x.shape[1:]:
        raise DataError(f"npz key '{key}' in '{file}' has shape {x.shape}; expected (num_samples, features...) "
                        "with at least one sample and at least one feature per sample",
                        f"reshape {key} so that axis 0 indexes samples")
    return _checks.finite_features(f"npz key '{key}' in '{file}'", x, f"clean or impute {key} before saving")


def _integers(arrays: dict, key: str, file: str, length: int, what: str, high: int,
              why: str = "", fix_high: str | None = None) -> np.ndarray:
    """``arrays[key]`` as ``int64``: one integer per sample in ``0..high`` (checked before any cast, so a
    huge or unsigned 64-bit value is refused, never wrapped around)."""
    values = arrays[key]
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1 or len(values) != length:
        raise DataError(f"npz key '{key}' in '{file}' has shape {values.shape}; expected ({length},), "
                        f"one {what} per sample", f"store {key} as a 1-D array of length {length}")
    fix = f"encode {key} as integers 0..K-1 (e.g. with np.unique(..., return_inverse=True))"
    integral = np.issubdtype(values.dtype, np.integer) or (
        np.issubdtype(values.dtype, np.floating) and bool(np.all(np.isfinite(values)))
        and bool(np.all(values == np.round(values))))
    if not integral:
        raise DataError(f"npz key '{key}' in '{file}' must hold integer {what}s, got dtype {values.dtype}", fix)
    if len(values) and values.min() < 0:
        raise DataError(f"npz key '{key}' in '{file}' has a negative {what} ({values.min()})", fix)
    if len(values) and values.max() > high:
        raise DataError(f"npz key '{key}' in '{file}' has {what} {values.max()}, above the largest allowed, "
                        f"{high}{why}", fix_high or fix)
    return values.astype(np.int64)


def _label_rule(total: int, num_classes: int | None) -> tuple[int, str, str | None]:
    """Largest allowed label, why, and the fix: ``num_classes - 1`` when the option is set, else the
    bound of :func:`~fedsim.data._checks.class_bound` (no more classes than samples, nor than MAX_CLASSES)."""
    if num_classes is not None:
        return (num_classes - 1, f" ({CLASSES_KEY} = {num_classes})",
                f"raise {CLASSES_KEY} or leave it unset to take the largest label + 1")
    bound = _checks.class_bound(total)
    return (bound - 1, f": labels are classes 0..K-1 and K may not exceed the {total} samples nor "
            f"{_checks.MAX_CLASSES} (fedsim.data._checks.MAX_CLASSES), so this looks like an id, not a class",
            None)


def _check_keys(arrays: dict, file: str) -> None:
    found = ", ".join(sorted(arrays)) or "(none)"
    for key in ("x_train", "y_train"):
        if key not in arrays:
            raise DataError(f"npz file '{file}' has no key '{key}' (found: {found})",
                            "save with np.savez(path, x_train=..., y_train=..., [x_test=..., y_test=...])")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"npz file '{file}' has only one of 'x_test' and 'y_test' (found: {found})",
                        "store both x_test and y_test, or neither to let fedsim split the training data")


@register_dataset("npz")
def npz(seed: int, test_fraction: float, path: str = "", num_classes: int | None = None) -> Dataset:
    """Load the user's arrays from the ``.npz`` file at ``path``.

    ``num_classes`` defaults to the largest label + 1; it may not exceed the number of samples nor
    :data:`~fedsim.data._checks.MAX_CLASSES` (a larger label is an id that was never encoded, and a
    model with an output per id would not fit in memory). Without ``x_test``/``y_test`` the test
    split is ``test_fraction`` of the training arrays, stratified by label and seeded.
    Every problem raises :class:`~fedsim.errors.DataError` naming the npz key and the fix.
    """
    arrays = _read(path)
    _check_keys(arrays, path)
    x_train = _features(arrays, "x_train", path)
    x_test = _features(arrays, "x_test", path) if "x_test" in arrays else None
    if x_test is not None and x_test.shape[1:] != x_train.shape[1:]:
        raise DataError(f"npz key 'x_test' in '{path}' has sample shape {x_test.shape[1:]} but x_train has "
                        f"{x_train.shape[1:]}", "store test and training samples with the same shape")
    total = len(x_train) + (0 if x_test is None else len(x_test))
    if num_classes is not None:
        num_classes = _checks.int_in_range(CLASSES_KEY, num_classes, 1, _checks.class_bound(total))
    top_label, why, fix = _label_rule(total, num_classes)
    ids_high = int(np.iinfo(np.int64).max)
    y_train = _integers(arrays, "y_train", path, len(x_train), "label", top_label, why, fix)
    ids = (_integers(arrays, "natural_ids", path, len(x_train), "owner id", ids_high)
           if "natural_ids" in arrays else None)
    if x_test is not None:
        y_test = _integers(arrays, "y_test", path, len(x_test), "label", top_label, why, fix)
        ids_test = (_integers(arrays, "natural_ids_test", path, len(x_test), "owner id", ids_high)
                    if "natural_ids_test" in arrays else None)
    else:
        train, test = split_train_test(x_train, y_train, test_fraction, numpy_rng(seed, "dataset", "npz", "split"))
        x_train, y_train, x_test, y_test = x_train[train], y_train[train], x_train[test], y_train[test]
        ids, ids_test = (None, None) if ids is None else (ids[train], ids[test])
    if num_classes is None:
        num_classes = int(np.concatenate([y_train, y_test]).max()) + 1
    return Dataset(x_train, y_train, x_test, y_test, num_classes=num_classes, input_shape=x_train.shape[1:],
                   name="npz", natural_ids=ids, natural_ids_test=ids_test)
