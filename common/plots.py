"""curves.png: training loss and validation Dice per round, per hospital."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(report: dict[str, Any], path: Path) -> None:
    rounds = report["rounds"]
    hospitals = sorted({h for r in rounds for h in r["hospitals"]})
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(11, 4))
    for h in hospitals:
        pts = [(r["round"], r["hospitals"][h]) for r in rounds if h in r["hospitals"]]
        ax_loss.plot([x for x, _ in pts], [m["train_loss"] for _, m in pts], marker="o", label=h)
        dice = [(x, m["val_dice"]) for x, m in pts if m.get("val_dice") is not None]
        ax_dice.plot([x for x, _ in dice], [d for _, d in dice], marker="o", label=h)
    glob = [(r["round"], r["global_val_dice"]) for r in rounds
            if r.get("global_val_dice") is not None]
    ax_dice.plot([x for x, _ in glob], [d for _, d in glob], color="black", linewidth=2.5,
                 label="global (weighted)")
    ax_loss.set(title="local training loss (Dice + CE)", xlabel="round", ylabel="loss")
    ax_dice.set(title="validation Dice of the global model", xlabel="round", ylabel="Dice",
                ylim=(0, 1))
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    title = f"{report['config'].get('mode', '')}: test-site Dice {report.get('test_dice', 0):.3f}"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
