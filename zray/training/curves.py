"""Training curves: one PNG per fit, a panel per logged metric, read by the run's report.

    save_curves(path, history, keys, title) -> bool

`history` is a learner fit's log (`FitResult.history`: one dict per logged step, with "step"); `keys` are the
metrics worth a panel, in order; those the history never logged are left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def save_curves(path: Path, history: Sequence[dict[str, float]], keys: Sequence[str], title: str) -> bool:
    """Write `path` with one panel per key of `keys` that `history` logged (against "step"); returns whether a
    figure was written (False: an empty history, or none of the keys logged)."""
    shown = [k for k in keys if any(k in h for h in history)]
    if not shown:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 2.8), squeeze=False)
    for ax, key in zip(axes[0], shown, strict=True):
        points = [(h["step"], h[key]) for h in history if key in h]
        ax.plot([s for s, _ in points], [v for _, v in points], marker=".")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
