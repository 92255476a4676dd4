"""The evaluation's figures: likely samples beside their neighbours, example images per set, fine-tuning losses."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from reid_batch.formats import figure_png, grey_uint8

GRID_MAX_PAIRS = 24


def likely_grid_png(reconstructions: torch.Tensor, neighbours: torch.Tensor | None, captions: list[str],
                    title: str) -> bytes:
    """Up to GRID_MAX_PAIRS reconstructions, each beside its nearest training image when known."""
    count = min(len(captions), GRID_MAX_PAIRS)
    columns = 4
    rows = max(1, math.ceil(count / columns))
    figure = Figure(figsize=(2.6 * columns, 1.55 * rows + 0.6), dpi=100)
    figure.suptitle(title, fontsize=10)
    for i in range(rows * columns):
        axes = figure.add_subplot(rows, columns, i + 1)
        axes.axis("off")
        if i < count:
            pair = grey_uint8(reconstructions[i])
            if neighbours is not None:
                pair = np.concatenate([pair, np.full((pair.shape[0], 2), 255, np.uint8), grey_uint8(neighbours[i])],
                                      axis=1)
            axes.imshow(pair, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            axes.set_title(captions[i], fontsize=7)
    if count == 0:
        figure.text(0.5, 0.5, "no likely samples", ha="center", va="center")
    figure.tight_layout()
    return figure_png(figure)


def stage1_examples_png(sets: dict[str, torch.Tensor], per_row: int = 8) -> bytes:
    figure = Figure(figsize=(1.1 * per_row + 1.2, 1.2 * len(sets) + 0.3), dpi=100)
    for r, (name, images) in enumerate(sets.items()):
        for c in range(per_row):
            axes = figure.add_subplot(len(sets), per_row, r * per_row + c + 1)
            axes.set_xticks([])
            axes.set_yticks([])
            if c < len(images):
                axes.imshow(grey_uint8(images[c]), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            if c == 0:
                axes.set_ylabel(name, fontsize=8)
    figure.tight_layout()
    return figure_png(figure)


def losses_png(losses: pd.DataFrame, title: str) -> bytes:
    figure = Figure(figsize=(9, 3.6), dpi=100)
    total_axes, term_axes = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    terms = [c for c in losses.columns if c not in ("step", "total", "grad_norm", "seconds", "elapsed")]
    if len(losses):
        total_axes.plot(losses["step"], losses["total"], color="black")
        for term in terms:
            term_axes.plot(losses["step"], losses[term], label=term)
        if terms and (losses[terms].to_numpy() > 0).all():
            term_axes.set_yscale("log")
        if terms:
            term_axes.legend(fontsize=7)
    total_axes.set(xlabel="step", ylabel="weighted total", title="objective (weighted total)")
    term_axes.set(xlabel="step", ylabel="unweighted value", title="terms (unweighted)")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure_png(figure)
