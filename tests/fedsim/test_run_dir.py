"""Run directories (issue 9, part 3): exclusive creation, names kept under ``run.output``, ``--out``
refused when it already holds something (unless ``--overwrite`` on a run directory), per-process
temporary names for atomic writes."""

import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.engines.local import run_local
from fedsim.errors import RunDirectoryError
from fedsim.results import RunRecorder, atomic_write, create_run_dir, prepare_out_dir, safe_name
from fedsim.server import default_run_dir
from tests.conftest import tiny


def test_two_runs_in_the_same_second_get_two_directories(tmp_path):
    s = tiny(run={"output": str(tmp_path)})
    a, b = default_run_dir(s), default_run_dir(s)          # same name, seed and (almost surely) second
    assert a != b and a.is_dir() and b.is_dir()
    fixed = [create_run_dir(tmp_path / "o", "x", 1, stamp="20250101-000000") for _ in range(3)]
    assert [p.name for p in fixed] == ["x-20250101-000000-s1", "x-20250101-000000-s1-2", "x-20250101-000000-s1-3"]


@pytest.mark.parametrize("name", ["../../x", "/etc/passwd", "..", "a/../../b", "we ird\\name", ""])
def test_run_name_cannot_leave_the_output_directory(name, tmp_path):
    out = tmp_path / "runs"
    path = default_run_dir(tiny(run={"name": name, "output": str(out)}))
    assert path.resolve().parent == out.resolve()
    assert path.name.startswith(safe_name(name))


@given(st.text(max_size=40))
def test_safe_name_is_one_harmless_path_component(name):
    s = safe_name(name)
    assert s and "/" not in s and "\\" not in s and s not in (".", "..") and not s.startswith(".")
    assert set(s) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def test_out_on_a_non_empty_directory_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirectoryError, match="not empty") as err:
        prepare_out_dir(tmp_path)
    assert err.value.exit_code == 11 and "--overwrite" in err.value.hint
    with pytest.raises(RunDirectoryError, match="config.toml"):
        prepare_out_dir(tmp_path, overwrite=True)          # not a run directory: never deleted
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert prepare_out_dir(tmp_path / "new") == tmp_path / "new" and (tmp_path / "new").is_dir()
    with pytest.raises(RunDirectoryError, match="is a file"):
        prepare_out_dir(tmp_path / "notes.txt")


def test_overwrite_leaves_no_stale_checkpoint(tmp_path):
    out = tmp_path / "run"
    run_local(tiny(["run.rounds=3"]), out)
    assert (out / "checkpoints" / "round_0003.npz").exists()
    run_local(tiny(["run.rounds=1"]), prepare_out_dir(out, overwrite=True))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest.json", "round_0001.npz"]


def test_a_directory_holding_a_run_is_never_written_over(tmp_path):
    run_local(tiny(["run.rounds=1"]), tmp_path)
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(RunDirectoryError, match="already holds a run"):
        run_local(tiny(["run.rounds=1", "run.seed=9"]), tmp_path)
    with pytest.raises(RunDirectoryError):
        RunRecorder(tmp_path, tiny())
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_atomic_write_uses_a_temporary_name_per_writer(tmp_path):
    target = tmp_path / "summary.json"
    errors: list[BaseException] = []

    def writer(tag: str) -> None:
        try:
            for i in range(200):
                atomic_write(target, f"{tag}{i}" * 50)
        except BaseException as err:  # noqa: BLE001 - the test collects what a shared tmp name causes
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(t,)) for t in "abcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:1]
    text = target.read_text()
    assert any(text == f"{t}{i}" * 50 for t in "abcd" for i in range(200))    # one whole version
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]      # no temporary file left behind


@settings(max_examples=25, deadline=None)
@given(st.binary(max_size=2048) | st.text(max_size=512))
def test_atomic_write_round_trips(tmp_path_factory, data):
    path = Path(tmp_path_factory.mktemp("aw")) / "f.bin"
    atomic_write(path, data)
    got = path.read_bytes()
    assert got == (data.encode() if isinstance(data, str) else data)
    assert [p.name for p in path.parent.iterdir()] == ["f.bin"]


def test_run_local_into_a_fresh_default_directory_is_complete(tmp_path):
    s = tiny(["run.rounds=1"], run={"output": str(tmp_path)})
    out = default_run_dir(s)
    summary = run_local(s, out)
    assert summary["status"] == "completed" and Path(summary["run_dir"]) == out
    assert np.isfinite(summary["final"]["test_loss"])
