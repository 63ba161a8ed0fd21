"""Matplotlib helpers every notebook uses, so the lessons share one look."""

from __future__ import annotations

from typing import Mapping

import matplotlib

matplotlib.use(matplotlib.get_backend())  # respect Jupyter's inline backend; Agg elsewhere
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .training import History  # noqa: E402


def smooth(values: list[float], window: int) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    values = np.asarray(values, dtype=float)
    if window <= 1 or len(values) == 0:
        return values
    cumsum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (cumsum[idx] - cumsum[lo]) / (idx - lo)


def plot_losses(histories: Mapping[str, History], *, window: int = 5, ax=None, title: str = "training loss",
                log_y: bool = False):
    """One line per run: smoothed training loss against optimizer step."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    for name, history in histories.items():
        ax.plot(history.step, smooth(history.loss, window), label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


def plot_bars(values: Mapping[str, float], *, ylabel: str, ax=None, title: str = "", fmt: str = "{:.3g}"):
    """A labelled bar per entry, with the value written on top."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    names, heights = list(values), list(values.values())
    bars = ax.bar(names, heights, color=plt.rcParams["axes.prop_cycle"].by_key()["color"][:len(names)])
    for bar, h in zip(bars, heights):
        ax.annotate(fmt.format(h), (bar.get_x() + bar.get_width() / 2, h), ha="center", va="bottom", fontsize=9)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return ax
