"""Pictures and charts of predictions (matplotlib, Agg). The only module of the
match/evaluate/report side that reads images, and only to draw them.

Pair pictures: each keypoint has one colour, in the source and for its prediction in the
target; the ground truth is a white cross outlined in black (visible on light and dark
images), a prediction is a filled dot when correct (within the threshold) and a hollow
one when not, joined to its ground truth by a line. A legend says so.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.patheffects as effects  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from semcorr.pipeline.io import atomic_path  # noqa: E402

OUTLINE = [effects.withStroke(linewidth=2.2, foreground="black")]


def read_image(path: Path) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def keypoint_colours(n: int) -> np.ndarray:
    """``[n, 4]`` RGBA: keypoint k's colour in every panel."""
    return plt.cm.tab20(np.arange(n) % 20)


def draw_points(ax, image: np.ndarray, xy: np.ndarray, colours, title: str = "") -> None:
    ax.imshow(image)
    ax.scatter(xy[:, 0], xy[:, 1], s=30, c=colours, edgecolors="white", linewidths=0.9)
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def draw_prediction(ax, image, gt_xy, pred_xy, visible, threshold: float, colours, title: str = "") -> None:
    """Target image: ground truth (outlined white crosses), predictions in their keypoint's
    colour (filled: within ``threshold`` pixels; hollow: not), a line from each truth to its
    prediction; visible keypoints only."""
    ax.imshow(image)
    gt, pred, colours = gt_xy[visible], pred_xy[visible], np.asarray(colours)[visible]
    ok = np.linalg.norm(pred - gt, axis=1) <= threshold
    for (gx, gy), (px, py), colour in zip(gt, pred, colours):
        ax.plot([gx, px], [gy, py], color=colour, linewidth=1.0)
    ax.scatter(gt[:, 0], gt[:, 1], s=34, marker="x", c="white", linewidths=1.4, path_effects=OUTLINE, zorder=3)
    ax.scatter(pred[ok, 0], pred[ok, 1], s=30, c=colours[ok], edgecolors="black", linewidths=0.6, zorder=4)
    ax.scatter(pred[~ok, 0], pred[~ok, 1], s=30, facecolors="none", edgecolors=colours[~ok], linewidths=1.6,
               path_effects=OUTLINE, zorder=4)
    ax.set_title(f"{title} {int(ok.sum())}/{len(ok)} correct".strip(), fontsize=8)
    ax.set_axis_off()


def legend(fig, alpha: float) -> None:
    handles = [
        Line2D([], [], marker="x", color="white", markeredgecolor="black", linestyle="none", markersize=7,
               path_effects=OUTLINE, label="ground truth"),
        Line2D([], [], marker="o", color="tab:blue", markeredgecolor="black", linestyle="none",
               label=f"prediction within {alpha:g} x normaliser"),
        Line2D([], [], marker="o", markerfacecolor="none", color="tab:blue", linestyle="none", label="prediction outside"),
        Line2D([], [], color="tab:blue", label="truth to prediction (keypoint's colour)"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=7, frameon=False)


def pair_figure(source, target, src_xy, gt_xy, predictions: dict[str, np.ndarray], visible, threshold: float,
                alpha: float, title: str):
    """One row: source keypoints, then the target with each named prediction (baseline, tuned)."""
    fig, axes = plt.subplots(1, 1 + len(predictions), figsize=(3.3 * (1 + len(predictions)), 3.9), squeeze=False)
    colours = keypoint_colours(len(src_xy))
    draw_points(axes[0, 0], source, src_xy[visible], colours[visible], "source")
    for ax, (label, pred_xy) in zip(axes[0, 1:], predictions.items()):
        draw_prediction(ax, target, gt_xy, pred_xy, visible, threshold, colours, label)
    fig.suptitle(title, fontsize=9)
    legend(fig, alpha)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def grid_figure(rows: list[dict], alpha: float, title: str):
    """Rows of (source, then the target with each run's prediction): each row dict holds
    source, target, src_xy, gt_xy, visible, pck_norm, name and ``predictions``
    {run label: pred_xy} (baseline and tuned side by side)."""
    columns = 1 + max(len(r["predictions"]) for r in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(3.2 * columns, 3.2 * len(rows) + 0.5), squeeze=False)
    for ax_row, row in zip(axes, rows):
        vis = row["visible"]
        colours = keypoint_colours(len(row["src_xy"]))
        draw_points(ax_row[0], row["source"], row["src_xy"][vis], colours[vis], row["name"])
        for ax, (label, pred_xy) in zip(ax_row[1:], row["predictions"].items()):
            draw_prediction(ax, row["target"], row["gt_xy"], pred_xy, vis, alpha * row["pck_norm"], colours, label)
    fig.suptitle(f"{title} (alpha {alpha:g})", fontsize=9)
    legend(fig, alpha)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
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


def alpha_curves(rows, title: str):
    """PCK per image against alpha, one line per variant with its 95% band. ``rows``: the
    summary table's rows of one (dataset, method) (`pipeline.summary.evaluations_table`)."""
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for k, row in enumerate(rows.to_dict("records")):
        alphas = sorted(float(c.split("@")[1]) for c in row if c.startswith("pck_img@") and not c.endswith(("_lo", "_hi")))
        value = [100 * (row[f"pck_img@{a:g}"] or np.nan) for a in alphas]
        low = [100 * (row[f"pck_img@{a:g}_lo"] or np.nan) for a in alphas]
        high = [100 * (row[f"pck_img@{a:g}_hi"] or np.nan) for a in alphas]
        colour = plt.cm.tab10(k % 10)
        label = row["variant"] + ("  [random-init]" if row.get("random_init") else "")
        ax.plot(alphas, value, marker="o", color=colour, label=label)
        ax.fill_between(alphas, low, high, color=colour, alpha=0.15)
    ax.set_xlabel("alpha (threshold / normaliser)")
    ax.set_ylabel("PCK per image (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def difficulty_chart(rows, title: str):
    """PCK per level of each SPair-71k difficulty flag, bars per variant. ``rows``:
    `pipeline.summary.difficulty_table` rows of one (dataset, method)."""
    flags = list(dict.fromkeys(rows["flag"]))
    variants = list(dict.fromkeys(rows["variant"]))
    fig, axes = plt.subplots(1, len(flags), figsize=(3.0 * len(flags) + 1.5, 3.2), squeeze=False)
    width = 0.8 / max(len(variants), 1)
    for ax, flag in zip(axes[0], flags):
        at = rows[rows["flag"] == flag]
        levels = sorted(at["level"].unique())
        for k, variant in enumerate(variants):
            mine = at[at["variant"] == variant].set_index("level")
            ax.bar(np.arange(len(levels)) + (k - (len(variants) - 1) / 2) * width,
                   [100 * mine["pck"].get(level, np.nan) for level in levels], width, label=variant,
                   color=plt.cm.tab10(k % 10))
        ax.set_xticks(np.arange(len(levels)), [str(level) for level in levels])
        ax.set_title(flag.replace("_", " "), fontsize=8)
        ax.set_ylim(0, 100)
    axes[0, 0].set_ylabel("PCK@0.1 per image (%)")
    axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def save(fig, path: Path) -> Path:
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return Path(path)
