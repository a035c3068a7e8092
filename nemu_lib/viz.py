"""Figures that the notebooks draw more than once: images, maps, mask outlines, grids, mosaics, curves and bars.

The functions take tensors as the notebooks hold them: images ``(3, H, W)`` / ``(B, 3, H, W)`` in [0, 1], maps
``(H, W)`` / ``(B, H, W)``, masks bool or float ``(H, W)`` / ``(B, H, W)``, on any device and of any dtype. They
are copied to the CPU as float64 before drawing. Functions that draw on axes (``show_image``, ``show_map``,
``outline``, ``overlay``, ``tile_borders``, ``concept_map``) take the ``ax`` and return the artist they add.
Functions that make a figure return ``(fig, axes)`` and use matplotlib's constrained layout, so do not call
``tight_layout`` on them. Nothing here calls ``plt.show()``: the notebook calls ``savefig(fig, name, prefix)``
and then shows the figure.

>>> fig, axes = map_grid(batch["image"][:4], {"R": out.importance, "U": out.uncertainty},
...                      masks=batch["object_mask"][:4], cmap={"U": "magma"})
>>> savefig(fig, "maps", prefix="02")                                  # outputs/figures/02_maps.png
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.colors import to_rgb
from matplotlib.contour import QuadContourSet
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Patch, Rectangle
from torch import Tensor

from .config import outputs_dir
from .data import COLOURS, CONCEPT_CATEGORIES

ArrayLike = Tensor | np.ndarray | Sequence[float]


def _np(t: ArrayLike) -> np.ndarray:
    """``t`` (a tensor on any device and of any dtype, an array or a list) as a float64 numpy array."""
    if isinstance(t, Tensor):
        return t.detach().to("cpu", torch.float64).numpy()
    return np.asarray(t, dtype=np.float64)


def _fig_ax(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax


_PREFIX: list[str | None] = [None]  # the running notebook's figure prefix, set by use_defaults


def use_defaults(prefix: str | None = None) -> None:
    """Plotting defaults for the notebooks, and the prefix :func:`savefig` gives their figures (e.g. ``"03"``).

    Called by :func:`nemu_lib.notebook.setup`: pixel-exact images (no smoothing of 16-px masks), small titles.
    """
    _PREFIX[0] = prefix
    plt.rcParams.update({"image.interpolation": "nearest", "axes.titlesize": 9, "figure.dpi": 100})


def savefig(fig: Figure, name: str, prefix: str | None = None) -> Path:
    """Save ``fig`` as ``outputs_dir()/figures/{prefix}_{name}.png`` (``{name}.png`` without a prefix).

    ``prefix`` is the notebook's number, e.g. ``"02"``, so that figures sort by notebook; by default the one
    :func:`use_defaults` set. The folder is created if it is missing. Returns the path written (PNG, 120 dpi,
    bounding box tight).
    """
    prefix = prefix if prefix is not None else _PREFIX[0]
    path = outputs_dir() / "figures" / (f"{prefix}_{name}.png" if prefix else f"{name}.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def show_image(ax: Axes, image: ArrayLike, title: str | None = None) -> AxesImage:
    """Draw an image ``(3, H, W)`` in [0, 1], or a grey ``(H, W)`` one (a mask) on [0, 1], without axis ticks.

    Values outside [0, 1] are clipped, e.g. ``denormalize(x)`` after masking. Returns the ``AxesImage``.
    """
    a = _np(image)
    if a.ndim == 3:
        a = a.transpose(1, 2, 0)  # (H, W, C) for imshow
        a = a[..., 0] if a.shape[-1] == 1 else a
    if a.ndim != 2 and (a.ndim != 3 or a.shape[-1] not in (3, 4)):
        raise ValueError(f"image must be (3, H, W) or (H, W), got {tuple(_np(image).shape)}")
    kwargs = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0} if a.ndim == 2 else {}
    im = ax.imshow(a.clip(0.0, 1.0), interpolation="nearest", **kwargs)
    if title is not None:
        ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    return im


def show_map(ax: Axes, m: ArrayLike, cmap: str = "viridis", vmin: float | None = None, vmax: float | None = None,
             title: str | None = None, colorbar: bool = False) -> AxesImage:
    """Draw a map ``(H, W)`` (importance, uncertainty, a NEM-U mask) on a colour scale.

    The default scale runs from the map's own minimum to its maximum. NaN pixels are light grey, e.g. the half of
    U-RELAX that is left out: ``importance.masked_fill(~keep, float("nan"))``.

    Args:
        cmap: "viridis" for importance, "magma" for uncertainty, "gray" for masks in [0, 1].
        vmin, vmax: a fixed colour scale, e.g. 0 and 1 for masks, or one shared by several maps.
        colorbar: add a colour bar beside the panel.

    Returns:
        The ``AxesImage`` (``im.get_clim()`` gives the scale).
    """
    a = _np(m)
    if a.ndim != 2:
        raise ValueError(f"a map must be (H, W), got {a.shape}")
    finite = a[np.isfinite(a)]
    lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    colours = plt.get_cmap(cmap).with_extremes(bad="lightgrey")
    im = ax.imshow(a, cmap=colours, vmin=lo, vmax=hi, interpolation="nearest")
    if title is not None:
        ax.set_title(title, fontsize=9)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_axis_off()
    return im


def outline(ax: Axes, mask: ArrayLike, color: str = "white", linewidth: float = 1.0,
            linestyle: str = "solid") -> QuadContourSet | None:
    """Draw the outline of a mask ``(H, W)`` (bool, or float in [0, 1]): the contour at level 0.5.

    Returns the contour set, or ``None`` when the mask is empty or full, because then it has no edge to draw.
    """
    a = _np(mask)
    if not (a.min() < 0.5 < a.max()):
        return None
    return ax.contour(a, levels=[0.5], colors=color, linewidths=linewidth, linestyles=linestyle)


def overlay(ax: Axes, image: ArrayLike, heatmap: ArrayLike, alpha: float = 0.5, cmap: str = "inferno",
            mask: ArrayLike | None = None, title: str | None = None) -> AxesImage:
    """Draw ``heatmap (h, w)`` over ``image (3, H, W)`` with transparency ``alpha``, plus the outline of ``mask``.

    The heatmap is stretched over the whole image, so a coarse map, e.g. a feature map of 8 x 8, lines up with
    its image. The mask's outline is cyan. Returns the heatmap's ``AxesImage``.
    """
    show_image(ax, image, title)
    h, w = _np(image).shape[-2:]
    a = _np(heatmap)
    im = ax.imshow(a, cmap=cmap, alpha=alpha, extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="bilinear")
    if mask is not None:
        outline(ax, mask, color="cyan", linewidth=0.8)
    return im


def image_grid(images: Tensor | Sequence[ArrayLike], titles: Sequence[str] | None = None, ncols: int = 8,
               masks: Tensor | Sequence[ArrayLike] | None = None, size: float = 1.8,
               suptitle: str | None = None) -> tuple[Figure, np.ndarray]:
    """Draw images ``(B, 3, H, W)`` (or grey ``(B, H, W)``) in rows of ``ncols`` panels, with titles if given.

    ``images`` may also be a list of images of different sizes. Unused panels of the last row stay blank. The
    outline of mask i (``masks (B, H, W)``) is drawn on image i. ``size`` is each panel's side in inches.

    Returns:
        ``fig`` and ``axes (rows, ncols)``.
    """
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, (size + 0.25) * nrows), squeeze=False,
                             layout="constrained")
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_axis_off()
            continue
        show_image(ax, images[i], titles[i] if titles is not None else None)
        if masks is not None:
            outline(ax, masks[i])
    if suptitle:
        fig.suptitle(suptitle)
    return fig, axes


def map_grid(images: Tensor, maps: Mapping[str, Tensor] | Sequence[Tensor], titles: Sequence[str] | None = None,
             shared_scale: bool = False, masks: Tensor | None = None, cmap: str | Mapping[str, str] = "viridis",
             colorbar: bool = False, transpose: bool = False, size: float = 1.9) -> tuple[Figure, np.ndarray]:
    """Draw one row per image: the image, then each method's map of it, the maps' names above the first row.

    Args:
        images: ``(B, 3, H, W)`` in [0, 1].
        maps: ``{name: (B, H, W)}``, or a list whose columns are called "map 1", "map 2", ... An entry of shape
            ``(B, 3, H, W)`` is drawn as images, e.g. ``denormalize(x * m)``.
        titles: one per image, above it.
        shared_scale: True puts every map in the grid on one colour scale, from the lowest to the highest value,
            to compare magnitudes. False gives each panel its own minimum to maximum, to compare patterns.
        masks: ``(B, H, W)``. The outline of mask i is drawn on every panel of image i.
        cmap: one colormap for every map, or ``{name: colormap}``. Unnamed maps use "viridis".
        colorbar: a colour bar beside every map panel, or a single one for the figure when ``shared_scale``.
        transpose: put the images in columns and the methods in rows, as for masks from two encoders.

    Returns:
        ``fig`` and ``axes (B, 1 + len(maps))``. ``axes[i, 0]`` is image i and ``axes[i, j]`` its j-th map,
        whatever ``transpose`` is.
    """
    named = dict(maps) if isinstance(maps, Mapping) else {f"map {j + 1}": m for j, m in enumerate(maps)}
    arrays = {k: _np(v) for k, v in named.items()}  # (B, H, W) or (B, 3, H, W)
    n = len(images)
    if any(len(a) != n for a in arrays.values()):
        raise ValueError(f"every map needs one entry per image ({n}), got {[len(a) for a in arrays.values()]}")
    lo = hi = None
    if shared_scale:
        finite = np.concatenate([a[np.isfinite(a)] for a in arrays.values() if a.ndim == 3])
        lo, hi = float(finite.min()), float(finite.max())
    cols = 1 + len(arrays)
    shape = (cols, n) if transpose else (n, cols)
    width = size * shape[1] * (1.3 if colorbar and not shared_scale else 1.0)  # room for a colour bar per panel
    fig, axes = plt.subplots(*shape, figsize=(width, (size + 0.3) * shape[0]), squeeze=False, layout="constrained")
    axes = axes.T if transpose else axes  # (B, cols) either way
    im = None
    for i in range(n):
        show_image(axes[i, 0], images[i], titles[i] if titles is not None else None)
        for j, (name, a) in enumerate(arrays.items(), start=1):
            title = name if i == 0 else None
            if a.ndim == 4:
                show_image(axes[i, j], a[i], title)
                continue
            colours = cmap.get(name, "viridis") if isinstance(cmap, Mapping) else cmap
            im = show_map(axes[i, j], a[i], colours, lo, hi, title, colorbar=colorbar and not shared_scale)
        if masks is not None:
            for ax in axes[i]:
                outline(ax, masks[i])
    if colorbar and shared_scale and im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
    return fig, axes


def tile_borders(ax: Axes, k: int, tile: int, highlight: int | None = None, color: str = "white",
                 linewidth: float = 2.0) -> Rectangle | None:
    """Draw thin lines between the ``k x k`` tiles of side ``tile`` px, and box tile ``highlight`` if it is given.

    Tiles are numbered row by row from 0, as ``data.mosaic`` lays out ``sources``. Returns the box (a
    ``Rectangle`` patch), or ``None`` when nothing is highlighted.
    """
    for j in range(1, k):
        ax.axhline(j * tile - 0.5, color=color, lw=0.5, alpha=0.5)
        ax.axvline(j * tile - 0.5, color=color, lw=0.5, alpha=0.5)
    if highlight is None:
        return None
    r, c = divmod(highlight, k)
    return ax.add_patch(Rectangle((c * tile - 0.5, r * tile - 0.5), tile, tile, fill=False, ec=color, lw=linewidth))


def mosaic_figure(mosaic: ArrayLike, k: int, maps: Tensor | Sequence[ArrayLike] | None = None,
                  queries: Sequence[int] | None = None, titles: Sequence[str] | None = None, cmap: str = "viridis",
                  size: float = 2.6) -> tuple[Figure, np.ndarray]:
    """Draw a ``k x k`` mosaic ``(3, kH, kW)`` with its tile borders, then one panel per map of it.

    Each map ``(kH, kW)`` explains the mosaic for one query tile, as RELAX does when its reference is that tile
    alone. That tile is boxed in white on the map's panel.

    Args:
        mosaic: one mosaic from ``data.mosaic``, in [0, 1]; ``k`` tiles per side.
        maps: ``(Q, kH, kW)``, one map per query, each on its own colour scale.
        queries: the tile each map explains, numbered row by row (default 0, 1, ..., Q - 1).
        titles: one per map (default "query: tile q + 1").

    Returns:
        ``fig`` and ``axes (1 + Q,)``. ``axes[0]`` is the mosaic.
    """
    tile = _np(mosaic).shape[-1] // k
    maps = [] if maps is None else maps
    queries = list(range(len(maps))) if queries is None else list(queries)
    fig, axes = plt.subplots(1, 1 + len(maps), figsize=(size * (1 + len(maps)), size + 0.3), squeeze=False,
                             layout="constrained")
    axes = axes[0]
    show_image(axes[0], mosaic, f"{k}×{k} mosaic")
    tile_borders(axes[0], k, tile)
    for j, (ax, q) in enumerate(zip(axes[1:], queries, strict=True)):
        show_map(ax, maps[j], cmap, title=titles[j] if titles is not None else f"query: tile {q + 1}")
        tile_borders(ax, k, tile, highlight=q)
    return fig, axes


def running_mean(values: ArrayLike, k: int) -> np.ndarray:
    """The mean of the last ``k`` values at each step, over fewer values at the start, for noisy curves."""
    c = np.concatenate([[0.0], np.cumsum(_np(values))])
    end = np.arange(1, len(c))
    begin = np.maximum(end - k, 0)
    return (c[end] - c[begin]) / (end - begin)


def training_curves(histories: Mapping[str, ArrayLike | tuple[ArrayLike, ArrayLike]], smooth: int = 20,
                    xlabel: str = "step", ylabel: str = "loss", log: bool = False, title: str | None = None,
                    ax: Axes | None = None) -> tuple[Figure, Axes]:
    """Plot one line per training curve against the step.

    Args:
        histories: ``{label: values}`` for values at steps 1, 2, ..., n, or ``{label: (steps, values)}`` for a
            validation loss measured every few steps.
        smooth: a curve with more than ``smooth`` points is drawn faint, and its running mean over ``smooth``
            steps is drawn on top. A shorter curve, such as a handful of validation points, is drawn as it is,
            with markers. Pass 1 to turn smoothing off.
        log: use a log scale for the y axis.
        ax: where to draw (default: a new figure).

    Returns:
        ``fig`` and ``ax``.
    """
    fig, ax = _fig_ax(ax, (6.5, 3.2))
    for j, (label, h) in enumerate(histories.items()):
        steps, values = (_np(h[0]), _np(h[1])) if isinstance(h, tuple) and len(h) == 2 else (None, _np(h))
        steps = np.arange(1, len(values) + 1) if steps is None else steps
        if smooth > 1 and len(values) > smooth:
            ax.plot(steps, values, lw=0.6, alpha=0.35, color=f"C{j}")
            ax.plot(steps, running_mean(values, smooth), lw=1.5, color=f"C{j}", label=f"{label} ({smooth}-step mean)")
        else:
            ax.plot(steps, values, "o-" if smooth > 1 else "-", ms=4, lw=1.2, color=f"C{j}", label=label)
    if log:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig, ax


def bars(values: Mapping[str, ArrayLike], labels: Sequence[str], errors: Mapping[str, ArrayLike] | None = None,
         stacked: bool = False, log: bool = False, colors: Mapping[str, str] | None = None, ylabel: str | None = None,
         title: str | None = None, rotation: float = 0.0, ax: Axes | None = None) -> tuple[Figure, Axes]:
    """Draw a bar chart with one group per label (a method, a layer) and one bar per series in each group.

    Args:
        values: ``{series: one value per label}``, e.g. ``{"simclr": [...], "supervised": [...]}``.
        labels: the groups' names on the x axis.
        errors: ``{series: one error per label}``, drawn as error bars (standard errors, say).
        stacked: stack the series in each group instead of placing them side by side, e.g. detector units by
            category.
        colors: ``{series: colour}`` (default: series j in ``"Cj"``).
        rotation: the angle of the x tick labels, in degrees.
        ax: where to draw (default: a new figure).

    Returns:
        ``fig`` and ``ax``. ``ax.patches`` holds one bar per series and label.
    """
    fig, ax = _fig_ax(ax, (max(4.0, 0.35 * len(labels) * (1 if stacked else len(values)) + 2), 3.4))
    pos = np.arange(len(labels))
    width = 0.8 if stacked else 0.8 / len(values)
    bottom = np.zeros(len(labels))
    for j, (name, v) in enumerate(values.items()):
        v = _np(v)
        err = _np(errors[name]) if errors is not None and name in errors else None
        colour = colors[name] if colors is not None and name in colors else f"C{j}"
        x = pos if stacked else pos + (j - (len(values) - 1) / 2) * width
        ax.bar(x, v, width, bottom=bottom if stacked else None, yerr=err, capsize=2, color=colour, label=name)
        bottom = bottom + v
    ax.set_xticks(pos, labels, rotation=rotation, ha="right" if rotation else "center")
    if log:
        ax.set_yscale("log")
    ax.set(ylabel=ylabel, title=title)
    ax.grid(True, axis="y", alpha=0.3)
    if len(values) > 1:
        ax.legend(fontsize=8)
    return fig, ax


def concept_map(ax: Axes, plane: ArrayLike, category: str, legend: bool = True,
                none_color: str = "white") -> AxesImage:
    """Draw one category's concept map of a scene, with a legend for the concepts it contains.

    ``plane (H, W)`` is one channel of a scene's ``"concepts"``: 0 where the category has no concept, v + 1 where
    it shows concept v of ``data.CONCEPT_CATEGORIES[category]``. The colour category uses each concept's true RGB.
    The other categories use tab10. Returns the ``AxesImage`` of the map drawn as RGB.
    """
    names = CONCEPT_CATEGORIES[category]
    cmap = plt.get_cmap("tab10")
    palette = [COLOURS[n] if category == "colour" else cmap(v)[:3] for v, n in enumerate(names)]
    p = np.rint(_np(plane)).astype(int)
    rgb = np.full((*p.shape, 3), to_rgb(none_color))
    for v, colour in enumerate(palette):
        rgb[p == v + 1] = colour
    im = ax.imshow(rgb, interpolation="nearest")
    ax.set_title(category, fontsize=9)
    ax.set_axis_off()
    handles = [Patch(color=palette[v], label=n) for v, n in enumerate(names) if (p == v + 1).any()]
    if legend and handles:
        ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=3, frameon=False)
    return im
