"""PNG figures of the fidelity and compare reports, drawn with matplotlib's Agg canvas (no pyplot, no display).

Every writer renders the figure through medsr's one atomic writer (:func:`medsr.io.atomic.atomic_path`): a temporary
file in the destination's directory renamed over ``path``, so a reader never sees a partial PNG and a failure leaves
no file behind (an existing file at ``path`` is kept as it was). Figures replace an existing file of the same name.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from medsr.errors import InputError, ShapeError
from medsr.eval.metrics import psnr
from medsr.io.atomic import atomic_path


def _new_figure(width: float, height: float):
    """A matplotlib Figure on its own Agg canvas, sizes in inches."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path) -> Path:
    """Write ``fig`` to ``path`` as PNG, atomically, replacing an existing file."""
    with atomic_path(path, overwrite=True) as tmp, open(tmp, "wb") as file:
        fig.savefig(file, format="png")
    return Path(path)


def _image(name: str, x) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.size == 0:
        raise ShapeError(f"{name} must be a non-empty 2-D (H, W) image, got shape {arr.shape}")
    return arr


def save_image_panel(path, lr, sr, hr, *, data_range: float, title: str | None = None) -> Path:
    """LR | SR | HR | |SR - HR| panel of one image, with the SR's PSNR in its caption.

    Args:
        path: destination .png.
        lr: (h, w) low-resolution input, shown at its own pixel size (nearest neighbour).
        sr: (H, W) super-resolved image.
        hr: (H, W) true HR image; LR, SR and HR share the grey scale [min HR, min HR + data_range].
        data_range: span of the intensity scale (the PSNR peak).
        title: optional figure title (e.g. the image id and configuration).
    """
    lr, sr, hr = _image("lr", lr), _image("sr", sr), _image("hr", hr)
    if sr.shape != hr.shape:
        raise ShapeError(f"sr and hr must have the same shape, got {sr.shape} and {hr.shape}")
    low = float(hr.min())
    grey = {"cmap": "gray", "vmin": low, "vmax": low + float(data_range), "interpolation": "nearest"}
    fig = _new_figure(13, 3.6)
    axes = fig.subplots(1, 4)
    captions = (f"LR {lr.shape[0]}x{lr.shape[1]}", f"SR ({psnr(sr, hr, data_range):.2f} dB)", "HR", "|SR - HR|")
    for ax, image, caption in zip(axes[:3], (lr, sr, hr), captions):
        ax.imshow(image, **grey)
        ax.set_title(caption)
    error = np.abs(sr - hr)
    shown = axes[3].imshow(error, cmap="magma", vmin=0.0, vmax=max(float(error.max()), 1e-12))
    axes[3].set_title(captions[3])
    fig.colorbar(shown, ax=axes[3], fraction=0.046)
    for ax in axes:
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    return _save_png(fig, path)


def save_band_chart(path, band_psnr: Mapping[str, Mapping[str, float]], *, title: str | None = None) -> Path:
    """Grouped bar chart of per-band wavelet PSNR, one colour per configuration.

    Args:
        path: destination .png.
        band_psnr: ``{config: {band: mean PSNR dB}}``; every config must have the same bands, in the order to draw
            (e.g. :func:`medsr.eval.metrics.wavelet_band_names`, coarse to fine). Non-finite values draw no bar.
        title: optional axes title.
    """
    if not band_psnr:
        raise InputError("band_psnr is empty: give at least one configuration")
    bands = list(next(iter(band_psnr.values())))
    for config, values in band_psnr.items():
        if list(values) != bands:
            raise InputError(f"config {config!r} has bands {list(values)}, expected {bands}")
    fig = _new_figure(max(6.0, 0.6 * len(bands) * len(band_psnr)), 4.0)
    ax = fig.subplots()
    width = 0.8 / len(band_psnr)
    x = np.arange(len(bands))
    for k, (config, values) in enumerate(band_psnr.items()):
        heights = np.array([values[b] for b in bands], dtype=np.float64)
        heights[~np.isfinite(heights)] = np.nan
        ax.bar(x + (k - (len(band_psnr) - 1) / 2) * width, heights, width=width, label=config)
    ax.set_xticks(x, bands)
    ax.set_xlabel("wavelet band (coarse to fine)")
    ax.set_ylabel("PSNR (dB)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title)
    return _save_png(fig, path)


def save_screening_plot(path, screening: Mapping, *, title: str | None = None) -> Path:
    """Scatter of mean SR PSNR against mean autoencoder-ceiling PSNR with the fitted line and its bootstrap band.

    Args:
        path: destination .png.
        screening: the ``"screening"`` entry of a :func:`medsr.eval.compare.compare_summaries` report; its ``fit``
            must not be None (>= 3 points).
        title: optional axes title.
    """
    fit = screening.get("fit")
    if fit is None:
        raise InputError(f"no screening fit to plot: {screening.get('note')}")
    points = screening["points"]
    fig = _new_figure(6.0, 4.5)
    ax = fig.subplots()
    grid = np.asarray(fit["x_grid"])
    ax.fill_between(
        grid, fit["band_low"], fit["band_high"], alpha=0.25, label=f"{fit['confidence']:.0%} bootstrap band"
    )
    ax.plot(grid, fit["intercept"] + fit["slope"] * grid, label=f"fit, R$^2$ = {fit['r_squared']:.2f}")
    for p in points:
        ax.scatter(p["ae_psnr"], p["sr_psnr"], color="C1", zorder=3)
        ax.annotate(
            f"{p['config']} / {p['dataset']}",
            (p["ae_psnr"], p["sr_psnr"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xlabel("autoencoder ceiling PSNR (dB)")
    ax.set_ylabel("SR PSNR (dB)")
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    return _save_png(fig, path)
