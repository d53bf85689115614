"""The probe plugins in a whole run: the final weights are bit-identical to the run without probes, the
metrics reach clients.jsonl per client per round, and `fedsim plot` draws plots/diagnostics.png."""

import numpy as np
import pytest

from fedsim.engines.local import run_local
from fedsim.plots import plot_run
from fedsim.plots_diagnostics import diagnostic_keys, draw_diagnostics
from fedsim.results import load_checkpoint, read_jsonl
from tests.conftest import tiny

PROBES = ['client.plugins=["cockpit", "grad_spectrum", "hessian_top"]', "client.cockpit.hutchinson_samples=4",
          "client.hessian_top.every=2", "client.hessian_top.k=2"]


def _final(run_dir) -> list[np.ndarray]:
    return load_checkpoint(run_dir / "checkpoints" / "round_0002.npz")["model"]


@pytest.mark.slow
def test_probes_never_change_the_run_and_are_written_and_plotted(tmp_path):
    plain, probed = tmp_path / "plain", tmp_path / "probed"
    # the plain run on the per-client path too: plugins always train per client, and the batched path
    # equals it only to float rounding (README "Batched clients")
    assert run_local(tiny(["run.vectorize=false"]), plain)["status"] == "completed"
    assert run_local(tiny(PROBES), probed)["status"] == "completed"
    for a, b in zip(_final(plain), _final(probed), strict=True):
        assert a.tobytes() == b.tobytes()
    ok = [c for c in read_jsonl(probed / "clients.jsonl") if c["status"] == "ok"]
    assert {c["round"] for c in ok} == {1, 2}
    for c in ok:
        assert np.isfinite(c["cockpit/hess_trace"]) and c["cockpit/distance"] > 0, c
        assert c["grad_spectrum/erank_mean"] > 0
        assert ("hessian_top/eig1" in c) == (c["round"] == 1)  # every = 2: rounds 1, 3, …
    assert "plots/diagnostics.png" not in {f"plots/{p.name}" for p in plot_run(plain)}
    files = {p.name: p for p in plot_run(probed)}
    assert files["diagnostics.png"].stat().st_size > 0


def test_the_diagnostics_figure_has_a_panel_per_probe_metric():
    clients = [{"round": r, "client": c, "status": "ok", "cockpit/hess_trace": 1.0 + r + c,
                "cockpit/hess_trace_se": 0.1, "grad_spectrum/erank_mean": 2.0, "grad_spectrum/0/erank": 2.5,
                "hessian_top/eig1": 0.5 * r, "hessian_top/converged": 1.0} for r in (1, 2, 3) for c in (0, 1)]
    clients.append({"round": 3, "client": None, "status": "quorum", "reason": "x"})
    assert diagnostic_keys(clients) == ["cockpit/hess_trace", "grad_spectrum/erank_mean", "hessian_top/eig1"]
    fig = draw_diagnostics(clients, "tiny · fedavg")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == diagnostic_keys(clients)
    mean_line = [ln for ln in panels[0].get_lines() if ln.get_label() == "mean over clients"][0]
    assert list(mean_line.get_ydata()) == pytest.approx([2.5, 3.5, 4.5])
    assert draw_diagnostics([{"round": 1, "client": 0, "status": "ok", "train_loss": 1.0}], "t") is None
