"""sample.png: one test slice with the true and the predicted tissue labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_sample(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, path: Path,
                title: str) -> None:
    """image (D, H, W) and label maps (D, H, W); shows the middle slice along D."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    k = image.shape[0] // 2
    cmap = ListedColormap([(0, 0, 0, 0), (1.0, 0.55, 0.0, 0.55), (0.2, 0.6, 1.0, 0.55)])
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    for ax, labels, name in zip(axes, (None, truth, pred), ("image", "true", "predicted"),
                                strict=True):
        ax.imshow(image[k], cmap="gray")
        if labels is not None:
            ax.imshow(labels[k], cmap=cmap, vmin=0, vmax=2, interpolation="nearest")
        ax.set_title(f"{name} (grey matter orange, white matter blue)" if name == "true"
                     else name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
