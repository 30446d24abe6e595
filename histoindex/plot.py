"""Pictures of predictions: the slide with predicted expression laid over it, one row per gene,
optionally beside the measured (truth) expression of a reference at the same spots.

Drawing uses matplotlib's object API (``Figure`` + the Agg canvas), never pyplot, so nothing here
touches global state or needs a display. Positions are level-0 slide pixels throughout; the
background is read from the slide at the resolution the picture needs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import SPOT_DIAMETER_UM, SpotSet
from .errors import InputError
from .io.predictions import Predictions, _positive, check_gene_names, read_predictions  # noqa: F401  (check_gene_names: re-exported)
from .io.write import cell_um
from .metrics import pearson_per_gene

#: picture formats matplotlib writes without extra libraries
PICTURE_SUFFIXES = (".png", ".pdf", ".svg")
#: spot diameter over centre-to-centre spacing, about the same on Visium (55/100) and ST (100/200)
SPOT_TO_SPACING = 0.55


# ---- colours and geometry -----------------------------------------------------------------
def colour_limits(*arrays: np.ndarray, low: float = 1.0, high: float = 99.0) -> tuple[float, float]:
    """A shared colour scale: the ``low``–``high`` percentiles of all finite values together."""
    values = np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays]) if arrays else np.empty(0)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    vmin, vmax = (float(v) for v in np.percentile(values, [low, high]))
    if not vmax > vmin:  # a constant gene still gets a usable scale
        pad = max(abs(vmin) * 0.05, 0.05)
        vmin, vmax = vmin - pad, vmax + pad
    return vmin, vmax


def value_colours(values: np.ndarray, *, vmin: float, vmax: float, cmap: str = "viridis", alpha: float = 1.0) -> np.ndarray:
    """RGBA (n × 4, floats in [0, 1]) for ``values`` on the scale [vmin, vmax] (clipped)."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    rgba = colormaps[cmap](Normalize(vmin, vmax, clip=True)(np.asarray(values, np.float64)))
    rgba[..., 3] = alpha
    return rgba


def _nice_length(target: float) -> float:
    """A round length (1, 2 or 5 × 10^k) not above ``target``."""
    if not target > 0:
        return 0.0
    power = 10 ** np.floor(np.log10(target))
    for step in (5, 2, 1):
        if step * power <= target:
            return float(step * power)
    return float(power)


@dataclass(frozen=True)
class _Layer:
    """One set of marks to draw: centres, values and the mark (square tiles or round spots)."""

    xy: np.ndarray
    values: np.ndarray
    square: bool
    size_px: float  # tile side or spot diameter, level-0 pixels


def _match(pred: Predictions, truth: SpotSet, *, tile_px: float, spot_px: float) -> tuple[np.ndarray, np.ndarray, str]:
    """Pairs (prediction row, truth row): by spot id when the query ran at the reference's spots,
    else each truth spot with the tile (or spot) whose area holds its centre (a tile's area: the
    cell of the grid's stride around its centre)."""
    truth_index = {s: i for i, s in enumerate(truth.obs_names)}
    if not pred.is_grid:
        pairs = [(i, truth_index[s]) for i, s in enumerate(pred.ids) if s in truth_index]
        if pairs:
            p, t = np.asarray(pairs).T
            return p, t, "spot id"
    from scipy.spatial import cKDTree

    tree = cKDTree(pred.xy)
    if pred.is_grid:  # the tile containing the spot centre (Chebyshev distance within half a side)
        dist, nearest = tree.query(truth.xy, k=1, p=np.inf)
        ok = dist <= tile_px / 2
    else:
        dist, nearest = tree.query(truth.xy, k=1)
        ok = dist <= spot_px / 2
    return nearest[ok], np.flatnonzero(ok), "position"


# ---- drawing ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Background:
    image: np.ndarray | None  # RGB of the view, or None for a blank canvas
    note: str = ""


def _view(layers: Sequence[_Layer], slide_size: tuple[int, int] | None) -> tuple[float, float, float, float]:
    """The region to show (x0, y0, x1, y1), level-0 pixels: every mark plus a margin, inside the slide."""
    lo = np.min([layer.xy.min(axis=0) - layer.size_px / 2 for layer in layers], axis=0)
    hi = np.max([layer.xy.max(axis=0) + layer.size_px / 2 for layer in layers], axis=0)
    margin = max(0.04 * float(np.max(hi - lo)), max(layer.size_px for layer in layers) / 2)
    x0, y0 = lo - margin
    x1, y1 = hi + margin
    if slide_size is not None:
        width, height = slide_size
        x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
        if x1 <= x0 or y1 <= y0:  # marks entirely off this slide: show them anyway
            x0, y0 = lo - margin
            x1, y1 = hi + margin
    return float(x0), float(y0), float(x1), float(y1)


def _open_slide(slide_path: Path | None, explicit: bool):
    """The slide to draw on, or None and a note saying why the canvas is blank. A slide named
    explicitly (``slide=``) must open; the path a query recorded may have moved."""
    from .io.slides import open_slide

    if slide_path is None:
        return None, "no slide path recorded; pass --slide to draw the tissue"
    if not slide_path.exists():
        if explicit:
            raise InputError(f"slide not found: {slide_path}")
        return None, f"slide not found: {slide_path}; pass --slide"
    try:
        return open_slide(slide_path), ""
    except InputError:
        if explicit:
            raise
        return None, f"cannot open slide {slide_path.name}; pass --slide"


def _read_background(slide, view, max_side: int) -> np.ndarray:
    """RGB of the view, its longer side ``max_side`` pixels at most (never upsampled)."""
    x0, y0, x1, y1 = view
    side = max(x1 - x0, y1 - y0)
    out_px = int(max(16, min(max_side, np.ceil(side))))
    square = slide.read_region(x0, y0, side, out_px)
    scale = out_px / side
    h, w = int(round((y1 - y0) * scale)), int(round((x1 - x0) * scale))
    return square[: max(h, 1), : max(w, 1)]


def _draw_panel(ax, layer: _Layer, background: _Background, view, *, norm, cmap: str, alpha: float, mpp: float | None):
    from matplotlib.collections import EllipseCollection, PolyCollection

    x0, y0, x1, y1 = view
    if background.image is not None:
        ax.imshow(background.image, extent=(x0, x1, y1, y0), interpolation="antialiased")
    else:
        ax.set_facecolor("#f2f2f2")
        if background.note:
            ax.text(0.02, 0.02, background.note, transform=ax.transAxes, fontsize=7, color="0.35", style="italic", va="bottom", wrap=True)
    if layer.square:
        half = layer.size_px / 2
        corners = np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
        marks = PolyCollection(layer.xy[:, None, :] + corners[None], linewidths=0, antialiaseds=False)
    else:
        d = np.full(len(layer.xy), layer.size_px)
        marks = EllipseCollection(d, d, np.zeros(len(d)), units="xy", offsets=layer.xy, offset_transform=ax.transData, linewidths=0)
    marks.set_array(layer.values)
    marks.set_cmap(cmap)
    marks.set_norm(norm)
    marks.set_alpha(alpha)
    ax.add_collection(marks)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)  # image rows grow downwards
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("0.8")
    if mpp:
        from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

        um = _nice_length((x1 - x0) * mpp / 5)
        if um > 0:
            label = f"{um / 1000:g} mm" if um >= 1000 else f"{um:g} µm"
            bar = AnchoredSizeBar(
                ax.transData, um / mpp, label, "lower right", pad=0.4, sep=3, frameon=True, size_vertical=max((y1 - y0) / 150, 1e-9), fontproperties={"size": 7}
            )
            bar.patch.set_alpha(0.75)
            bar.patch.set_edgecolor("none")
            ax.add_artist(bar)
    return marks


def render_predictions(
    predictions: str | Path | Predictions,
    *,
    genes: Sequence[str],
    slide: str | Path | None = None,
    truth: str | Path | SpotSet | None = None,
    max_side: int = 1600,
    cmap: str = "viridis",
    alpha: float | None = None,
    spot_um: float | None = None,
):
    """Draw predictions as a matplotlib ``Figure`` (Agg canvas attached) without writing it.

    One row per gene; with ``truth``, the measured expression (left) beside the prediction
    (right) on a shared colour scale, and Pearson r over the matched spots in the title. See
    :func:`plot_predictions` for the parameters.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    spot_alpha = min(1.0, alpha + 0.25) if alpha is not None else 0.85  # spots leave tissue between them: show them stronger
    alpha = 0.6 if alpha is None else alpha
    if not 0 < alpha <= 1:
        raise InputError(f"alpha must be in (0, 1], got {alpha}")
    if cmap not in colormaps:
        raise InputError(f"unknown colour map {cmap!r}; e.g. viridis, magma, cividis, Reds")
    if max_side < 16:
        raise InputError(f"max_side must be at least 16 pixels, got {max_side}")
    pred = predictions if isinstance(predictions, Predictions) else read_predictions(predictions, genes=genes)
    genes = check_gene_names(genes, pred.loaded, where=pred.path.name)
    if pred.n_obs == 0:
        raise InputError(f"{pred.path} holds no predictions")
    mpp = pred.mpp
    patch_um = _positive(pred.provenance.get("patch_um"))

    explicit = slide is not None
    slide_path = Path(slide) if slide is not None else (Path(pred.provenance["slide_path"]) if pred.provenance.get("slide_path") else None)
    if explicit and not slide_path.exists():  # before reading anything else
        raise InputError(f"slide not found: {slide_path}")

    truth_set = _read_truth(truth, slide_path, mpp) if truth is not None else None
    if truth_set is not None:
        truth_name = Path(truth_set.source).name if truth_set.source else truth_set.name
        check_gene_names(genes, [str(g) for g in truth_set.var_names], where=truth_name)

    # mark sizes, level-0 pixels (without a pixel size: from the spacing of the marks). A tile is
    # drawn as its cell, the grid's stride: overlapping windows on a fine grid make a fine map
    stride_um = cell_um(pred.provenance) if patch_um else None
    tile_px = stride_um / mpp if (stride_um and mpp) else _spacing(pred.xy)
    if spot_um is not None and mpp:
        spot_px = spot_um / mpp
    elif truth_set is not None and truth_set.spot_diameter_px:
        spot_px = float(truth_set.spot_diameter_px)
    elif pred.n_obs > 1:  # Visium 55 µm spots 100 µm apart, legacy ST 100 µm spots 200 µm apart
        spot_px = SPOT_TO_SPACING * _spacing(pred.xy)
    else:
        spot_px = SPOT_DIAMETER_UM["visium"] / mpp if mpp else 100.0
    pred_size = tile_px if pred.is_grid else spot_px

    if truth_set is not None:
        p_rows, t_rows, matched_by = _match(pred, truth_set, tile_px=tile_px, spot_px=spot_px)
        if len(p_rows) == 0:
            raise InputError(
                f"no spot of {truth_name} lies on a prediction of {pred.path.name} (matched by spot id, then position); "
                f"were the predictions made on that section (query --spots {truth_name})?"
            )
        truth_values = truth_set.normalized(genes)

    layers_for_view = [_Layer(pred.xy, pred.values[:, 0], pred.is_grid, pred_size)]
    if truth_set is not None:
        layers_for_view.append(_Layer(truth_set.xy, truth_values[:, 0], False, spot_px))
    opened, note = _open_slide(slide_path, explicit)
    try:
        view = _view(layers_for_view, (opened.width, opened.height) if opened is not None else None)
        background = _Background(_read_background(opened, view, max_side) if opened is not None else None, note)
    finally:
        if opened is not None:
            opened.close()
    if background.image is None:  # nothing to see through: opaque marks match the colour bar
        alpha = spot_alpha = 1.0

    # layout: panels sized to the view's aspect, one row per gene, a colour bar per row
    n_cols = 2 if truth_set is not None else 1
    aspect = (view[3] - view[1]) / max(view[2] - view[0], 1e-9)
    panel_w = (4.6 if n_cols == 2 else 5.4) * (0.85 if len(genes) >= 3 else 1.0)
    panel_h = panel_w * aspect
    if panel_h > 6.0:
        panel_w, panel_h = panel_w * 6.0 / panel_h, 6.0
    panel_h = max(panel_h, 1.6)
    fig = Figure(figsize=(n_cols * panel_w + 1.3, len(genes) * (panel_h + 0.55) + 0.75), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(genes), n_cols, squeeze=False)

    what = "tiles" if pred.is_grid else "spots"
    size_label = f" of {patch_um:g} µm" if (pred.is_grid and patch_um) else ""
    if pred.is_grid and patch_um and stride_um and stride_um < patch_um:
        size_label += f" every {stride_um:g} µm"
    title = f"{pred.slide}  ·  {pred.n_obs} {what}{size_label}"
    if truth_set is not None:
        title += f"  ·  truth: {truth_name} ({len(p_rows)} spots matched by {matched_by})"
    fig.suptitle(title, fontsize=11)
    model = pred.provenance.get("model_id")
    if model:
        version = pred.provenance.get("spots_version")
        fig.supxlabel(f"model {model}" + (f", spots@{version}" if version is not None else ""), x=0.995, ha="right", fontsize=6, color="0.5")

    for row, gene in enumerate(genes):
        values = pred.gene(gene)
        panels = []
        if truth_set is not None:
            t_values = truth_values[:, row]
            vmin, vmax = colour_limits(values, t_values)
            r = float(pearson_per_gene(t_values[t_rows, None], values[p_rows, None])[0])
            panels.append((_Layer(truth_set.xy, t_values, False, spot_px), f"{gene}  ·  measured"))
            panels.append((_Layer(pred.xy, values, pred.is_grid, pred_size), f"{gene}  ·  predicted   (r = {r:.2f}, n = {len(p_rows)})"))
        else:
            vmin, vmax = colour_limits(values)
            panels.append((_Layer(pred.xy, values, pred.is_grid, pred_size), f"{gene}  ·  predicted"))
        norm = Normalize(vmin, vmax, clip=True)
        for col, (layer, label) in enumerate(panels):
            ax = axes[row, col]
            _draw_panel(ax, layer, background, view, norm=norm, cmap=cmap, alpha=alpha if layer.square else spot_alpha, mpp=mpp)
            ax.set_title(label, fontsize=10, fontweight="bold" if col == n_cols - 1 else "normal")
        shown = np.concatenate([layer.values for layer, _ in panels])
        extend = {(False, False): "neither", (True, False): "min", (False, True): "max", (True, True): "both"}[
            (bool(shown.min() < vmin), bool(shown.max() > vmax))
        ]
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes[row]), shrink=0.85, aspect=20, pad=0.02, extend=extend)
        bar.set_label(f"{gene}  ({pred.units})", fontsize=9)
        bar.ax.tick_params(labelsize=8)
    return fig


def _spacing(xy: np.ndarray) -> float:
    """Median distance to the nearest neighbour (a fallback mark size)."""
    if len(xy) < 2:
        return 100.0
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(dist[:, 1])) or 100.0


def _read_truth(truth: str | Path | SpotSet, slide_path: Path | None, mpp: float | None) -> SpotSet:
    """A reference's SpotSet. Its positions are taken to be on the predictions' slide (the query
    ran at its spots), so that slide and pixel size stand in for an image the file may not find."""
    if isinstance(truth, SpotSet):
        return truth
    from .io.h5ad import read_h5ad

    path = Path(truth)
    if path.suffix.lower() != ".h5ad":
        raise InputError(f"unsupported truth {path}: expected a reference .h5ad (obsm['spatial'], expression in X)")
    image = slide_path if slide_path is not None and slide_path.exists() else None
    return read_h5ad(path, image=image, mpp=mpp)


def check_picture_path(path: str | Path) -> Path:
    """Fail before any work when the picture's type is unsupported or its folder is missing."""
    from .io.write import check_output_path

    return check_output_path(path, tuple(PICTURE_SUFFIXES), kind="picture type")


def picture_path(predictions: str | Path, gene: str) -> Path:
    """``<predictions stem>.<gene>.png`` beside the predictions file (``query --plot``)."""
    predictions = Path(predictions)
    safe = "".join("_" if c in (os.sep, "/", "\\") or not c.isprintable() else c for c in gene)
    return predictions.with_name(f"{predictions.stem}.{safe}.png")


def plot_predictions(
    predictions: str | Path | Predictions,
    *,
    genes: Sequence[str],
    out: str | Path,
    slide: str | Path | None = None,
    truth: str | Path | SpotSet | None = None,
    max_side: int = 1600,
    cmap: str = "viridis",
    alpha: float | None = None,
    spot_um: float | None = None,
    dpi: int = 120,
) -> Path:
    """Draw predicted expression over the slide and write the picture.

    Parameters
    ----------
    predictions: a ``query --out`` file (``.parquet`` or ``.h5ad``), or :class:`Predictions`.
    genes: genes to draw, one row each.
    out: the picture (``.png``, ``.pdf`` or ``.svg``).
    slide: the slide to draw under the predictions (default: the path recorded by the query; a
        blank canvas with a note when neither exists).
    truth: a reference ``.h5ad`` (or SpotSet) measured on the same section: drawn beside the
        prediction on a shared colour scale (1st–99th percentile of both), with Pearson r over
        spots matched by id (``query --spots REF.h5ad``) or else by position.
    max_side: longest side, in pixels, of the slide image read for the background.
    cmap, alpha: colour map and opacity of the overlay (default 0.6 for tiles; spots, which
        leave the tissue between them visible, are drawn 0.25 more opaque).
    spot_um: spot diameter in µm for spot predictions (default: the truth's spot diameter, else
        0.55 × the spots' spacing, as on Visium and legacy ST arrays).
    dpi: resolution of the written picture.

    Returns
    -------
    The path written.
    """
    out = check_picture_path(out)
    fig = render_predictions(predictions, genes=genes, slide=slide, truth=truth, max_side=max_side, cmap=cmap, alpha=alpha, spot_um=spot_um)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    try:
        fig.savefig(tmp, dpi=dpi, facecolor="white")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


__all__ = [
    "Predictions",
    "read_predictions",
    "check_gene_names",
    "colour_limits",
    "value_colours",
    "render_predictions",
    "plot_predictions",
    "check_picture_path",
    "picture_path",
]
