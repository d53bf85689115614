"""The diagnostics figure of a run: the probe plugins' metrics per client per round (``plots/diagnostics.png``).

The probes (``cockpit``, ``grad_spectrum``, ``hessian_top``: ``clients/plugins/``) write ``<plugin>/<key>``
metrics into each client's reply, which ``clients.jsonl`` keeps per client per round. One panel per
metric: every client as a thin line (up to :data:`MAX_CLIENT_LINES` clients; more are summarised only)
and the mean over clients in black with the min–max band. Per-layer ``grad_spectrum`` metrics are left
to the file (the panel shows their means over layers), the Hutchinson standard error is drawn as
error bars on the trace, and ``hessian_top/converged`` is not drawn. :func:`fedsim.plots.plot_run`
calls :func:`diagnostics_figures`.
"""

from __future__ import annotations

import math
from typing import Any

#: metric prefixes of the probe plugins
PROBES = ("cockpit/", "grad_spectrum/", "hessian_top/")
#: drawn as error bars of another panel, not as a panel of their own
ERROR_BARS = {"cockpit/hess_trace_se": "cockpit/hess_trace"}
#: bookkeeping kept in clients.jsonl but not drawn
NOT_DRAWN = {"hessian_top/converged"}
MAX_CLIENT_LINES = 20
COLUMNS = 3


def diagnostic_keys(clients: list[dict[str, Any]]) -> list[str]:
    """The probe metrics present in ``clients.jsonl`` records that get a panel, in a stable order."""
    keys = {k for c in clients for k, v in c.items()
            if k.startswith(PROBES) and isinstance(v, (int, float)) and not isinstance(v, bool)}
    per_layer = {k for k in keys if k.startswith("grad_spectrum/") and k.count("/") > 1}
    shown = [k for k in keys if k not in ERROR_BARS and k not in NOT_DRAWN and k not in per_layer]
    return sorted(shown, key=lambda k: (PROBES.index(next(p for p in PROBES if k.startswith(p))), k))


def _per_client(clients: list[dict[str, Any]], key: str) -> dict[int, dict[int, float]]:
    out: dict[int, dict[int, float]] = {}
    for c in clients:
        value = c.get(key)
        if c.get("client") is not None and isinstance(value, (int, float)) and math.isfinite(value):
            out.setdefault(int(c["client"]), {})[int(c["round"])] = float(value)
    return out


def draw_diagnostics(clients: list[dict[str, Any]], title: str) -> Any | None:
    """One panel per probe metric (clients' lines, mean and min–max band over rounds); ``None`` without any."""
    keys = diagnostic_keys(clients)
    if not keys:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = -(-len(keys) // COLUMNS)
    cols = min(COLUMNS, len(keys))
    fig = Figure(figsize=(3.6 * cols, 2.6 * rows + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, key in zip(axes.flat, keys):
        series = _per_client(clients, key)
        errors = _per_client(clients, next((e for e, k in ERROR_BARS.items() if k == key), ""))
        if len(series) <= MAX_CLIENT_LINES:
            for cid, points in sorted(series.items()):
                rounds = sorted(points)
                yerr = [errors.get(cid, {}).get(r, 0.0) for r in rounds] if errors else None
                ax.errorbar(rounds, [points[r] for r in rounds], yerr=yerr, lw=0.8, alpha=0.5, marker=".", ms=3,
                            capsize=2 if yerr else 0)
        rounds = sorted({r for points in series.values() for r in points})
        values = [[points[r] for points in series.values() if r in points] for r in rounds]
        ax.fill_between(rounds, [min(v) for v in values], [max(v) for v in values], color="grey", alpha=0.2,
                        label="min–max over clients")
        ax.plot(rounds, [sum(v) / len(v) for v in values], color="black", lw=1.8, marker="o", ms=3,
                label="mean over clients")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_title(key, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=6)
    clients_seen = len({c.get("client") for c in clients if any(k in c for k in keys)})
    fig.suptitle(f"{title}: diagnostics (probes, {clients_seen} clients)")
    return fig


def diagnostics_figures(clients: list[dict[str, Any]], title: str) -> dict[str, Any]:
    """``{"diagnostics.png": figure}`` when the run has probe metrics, else ``{}``."""
    fig = draw_diagnostics(clients, title)
    return {"diagnostics.png": fig} if fig is not None else {}
