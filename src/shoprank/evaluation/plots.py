"""PNG plots for MLflow / the approval card (matplotlib, no display needed).

Figures are built with ``matplotlib.figure.Figure`` directly (the Agg canvas), never through
``pyplot``, so nothing depends on the process-wide backend and plotting is safe in workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np


def _figure(width: float = 6.4, height: float = 4.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.subplots()


def plot_validation_curve(
    history: Sequence[float] | Sequence[dict[str, Any]],
    path: str | Path,
    *,
    metric: str = "val_ndcg_at_10",
    title: str = "Validation NDCG@10",
) -> Path:
    """Line plot of validation values.

    ``history`` is a list of floats (x = validation index) or of dicts with ``step`` and
    ``metric`` keys, as in ``TrainResult.val_history``.
    """
    if history and isinstance(history[0], dict):
        xs = [h.get("step", i) for i, h in enumerate(history)]  # type: ignore[union-attr]
        ys = [float(h[metric]) for h in history]  # type: ignore[index]
        xlabel = "training step"
    else:
        xs = list(range(1, len(history) + 1))
        ys = [float(v) for v in history]  # type: ignore[arg-type]
        xlabel = "validation"
    fig, ax = _figure()
    ax.plot(xs, ys, marker="o")
    if ys:
        best = int(np.nanargmax(ys))
        ax.scatter([xs[best]], [ys[best]], s=120, facecolors="none", edgecolors="tab:red", label=f"best {ys[best]:.4f}")
        ax.legend(loc="lower right")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_slice_metrics(
    report: Any,
    path: str | Path,
    *,
    slice_column: str = "query_freq_bucket",
    metric: str | None = None,
    max_values: int = 20,
) -> Path:
    """Grouped bars: ``metric`` per slice value (x) for each scorer, with query counts.

    ``report`` is an :class:`~shoprank.evaluation.report.EvaluationReport`.  Only the
    ``max_values`` largest slice values (by query count) are drawn.
    """
    metric = metric or report.primary_metric
    data = report.slices
    data = data[(data["slice_column"] == slice_column) & (data["metric"] == metric)]
    fig, ax = _figure(max(6.4, 0.6 * min(max_values, data["slice_value"].nunique() or 1) + 3), 4.0)
    if data.empty:
        ax.text(0.5, 0.5, f"no '{slice_column}' slices in the test split", ha="center", va="center")
        ax.set_axis_off()
    else:
        sizes = data.groupby("slice_value")["n_queries"].max().sort_values(ascending=False)
        values = list(sizes.index[:max_values])
        order = {"query_freq_bucket": ["head", "torso", "tail"]}.get(slice_column)
        if order:
            values = [v for v in order if v in values] + [v for v in values if v not in order]
        scorers = list(dict.fromkeys(data["scorer"]))
        width = 0.8 / max(1, len(scorers))
        x = np.arange(len(values))
        for i, name in enumerate(scorers):
            sub = data[data["scorer"] == name].set_index("slice_value").reindex(values)
            ax.bar(x + (i - (len(scorers) - 1) / 2) * width, sub["value"].to_numpy(), width, label=name)
        ax.set_xticks(x, [f"{v}\n(n={int(sizes[v])})" for v in values], fontsize=8)
        ax.set_ylabel(metric)
        ax.set_ylim(0, 1)
        ax.set_title(f"{metric} by {slice_column}")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
