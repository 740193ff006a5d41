"""Pictures of predictions (matplotlib, Agg). The only module of the match/evaluate/report
side that reads images, and only to draw them."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from semcorr.pipeline.io import atomic_path  # noqa: E402

CORRECT, WRONG = "#1db954", "#e0245e"


def read_image(path: Path) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def draw_points(ax, image: np.ndarray, xy: np.ndarray, colors: list[str], title: str = "") -> None:
    ax.imshow(image)
    ax.scatter(xy[:, 0], xy[:, 1], s=28, c=colors, edgecolors="white", linewidths=0.8)
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def draw_prediction(ax, image, gt_xy, pred_xy, visible, threshold: float, title: str = "") -> None:
    """Target image with ground truth (white crosses), predictions (green: within ``threshold``
    pixels, red: not) and a line from each ground truth to its prediction; visible keypoints only."""
    ax.imshow(image)
    gt, pred = gt_xy[visible], pred_xy[visible]
    ok = np.linalg.norm(pred - gt, axis=1) <= threshold
    for (gx, gy), (px, py), good in zip(gt, pred, ok):
        ax.plot([gx, px], [gy, py], color=CORRECT if good else WRONG, linewidth=0.8)
    ax.scatter(gt[:, 0], gt[:, 1], s=22, marker="x", c="white")
    ax.scatter(pred[:, 0], pred[:, 1], s=22, c=[CORRECT if g else WRONG for g in ok], edgecolors="black", linewidths=0.5)
    ax.set_title(f"{title} {int(ok.sum())}/{len(ok)} correct", fontsize=8)
    ax.set_axis_off()


def pair_figure(source, target, src_xy, gt_xy, predictions: dict[str, np.ndarray], visible, threshold: float, title: str):
    """One row: source keypoints, then the target with each named prediction (e.g. baseline, tuned)."""
    fig, axes = plt.subplots(1, 1 + len(predictions), figsize=(3.2 * (1 + len(predictions)), 3.4), squeeze=False)
    n = int(visible.sum())
    draw_points(axes[0, 0], source, src_xy[visible], plt.cm.tab20(np.arange(n) % 20), "source")
    for ax, (label, pred_xy) in zip(axes[0, 1:], predictions.items()):
        draw_prediction(ax, target, gt_xy, pred_xy, visible, threshold, label)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def grid_figure(rows: list[dict], threshold_alpha: float, title: str):
    """Rows of (source, target with prediction); each row dict: source, target, src_xy, gt_xy,
    pred_xy, visible, pck_norm, name."""
    fig, axes = plt.subplots(len(rows), 2, figsize=(6.4, 3.2 * len(rows)), squeeze=False)
    for (ax_s, ax_t), row in zip(axes, rows):
        vis = row["visible"]
        draw_points(ax_s, row["source"], row["src_xy"][vis], plt.cm.tab20(np.arange(int(vis.sum())) % 20), row["name"])
        draw_prediction(ax_t, row["target"], row["gt_xy"], row["pred_xy"], vis, threshold_alpha * row["pck_norm"])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def bar_chart(table, title: str):
    """Grouped horizontal bars: one group per category, one bar per variant.
    ``table``: rows category, variant, pck_img (percent), as `report.category_chart_table`."""
    categories = list(dict.fromkeys(table["category"]))
    variants = list(dict.fromkeys(table["variant"]))
    height = 0.8 / max(len(variants), 1)
    fig, ax = plt.subplots(figsize=(8.0, 1.2 + 0.3 * len(categories) * max(len(variants), 1) ** 0.5))
    positions = np.arange(len(categories))
    for k, variant in enumerate(variants):
        rows = table[table["variant"] == variant].set_index("category")
        values = [rows["pck_img"].get(c, np.nan) for c in categories]
        ax.barh(positions + (k - (len(variants) - 1) / 2) * height, values, height, label=variant,
                color=plt.cm.tab10(k % 10))
    ax.set_yticks(positions, categories, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("PCK@0.1 per image (%)")
    ax.set_xlim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def save(fig, path: Path) -> Path:
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return Path(path)
