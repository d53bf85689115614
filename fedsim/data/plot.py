"""Label distribution plot, like ``flwr_datasets.visualization.plot_label_distributions``.

Uses Matplotlib's Agg canvas directly, so it works headless and never changes the global backend.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedsim.data.federation import Federation, label_counts


def plot_label_distribution(federation: Federation, path: str | Path, *, title: str | None = None,
                            normalize: bool = False) -> Path:
    """Save a stacked bar chart of every client's samples per class.

    Parameters
    ----------
    federation
        The federation to draw; one bar per client, one colour per class.
    path
        Output image (PNG, SVG or PDF by suffix); parent folders are created.
    title
        Figure title (default: dataset name and number of clients).
    normalize
        Plot each client's class shares instead of counts.

    Returns
    -------
    Path
        Where the figure was written.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = label_counts(federation).astype(float)
    if normalize:
        counts = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    num_clients, num_classes = counts.shape
    figure = Figure(figsize=(min(max(6.0, 0.25 * num_clients + 2.0), 24.0), 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colours = colormaps["tab10" if num_classes <= 10 else "tab20"].resampled(num_classes)
    clients = np.arange(num_clients)
    bottom = np.zeros(num_clients)
    for label in range(num_classes):
        axes.bar(clients, counts[:, label], bottom=bottom, width=0.85, color=colours(label), label=str(label))
        bottom += counts[:, label]
    axes.set_xlabel("client")
    axes.set_ylabel("share of samples" if normalize else "samples")
    axes.set_xlim(-0.6, num_clients - 0.4)
    if num_clients <= 30:
        axes.set_xticks(clients)
    else:  # client ids are integers: never a tick between two clients
        from matplotlib.ticker import MaxNLocator

        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title(title or f"{federation.dataset.name}: labels over {num_clients} clients")
    axes.legend(title="class", loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small",
                ncols=1 if num_classes <= 20 else 2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path
