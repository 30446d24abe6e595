"""Spatial graphs stop at the tissue's edge (issue 19): smoothing and ST-GCHB's kNN graph drop
edges longer than 1.75 grid pitches (the positions' median nearest-neighbour distance, or the tile
stride when the caller knows it), so separate pieces of tissue never mix and a lone position
keeps its own prediction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histoindex.graph import MAX_EDGE_PITCHES, grid_pitch, knn_graph, knn_indices
from histoindex.impute import smoothed
from histoindex.methods import get_method
from histoindex.models import ModelConfig, create_model

STRIDE_UM = 112.0


def tiles(rows: int, cols: int, origin: tuple[float, float], pitch: float = STRIDE_UM) -> np.ndarray:
    """Row-major (x, y) tile centres in µm, a block of ``rows`` × ``cols`` at ``origin``."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    return np.c_[xx.ravel(), yy.ravel()].astype(np.float64) * pitch + np.asarray(origin)


def smooth_all(values: np.ndarray, xy: np.ndarray, **kw) -> np.ndarray:
    return np.concatenate(list(smoothed([values], xy, 0.5, **kw)))


def lengths(edges: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return np.hypot(*(xy[edges[0]] - xy[edges[1]]).T)


#: five regions 5-10 mm apart (µm)
FAR = np.array([[0.0, 0.0], [5000.0, 0.0], [5000.0, 7000.0], [12000.0, 3000.0], [0.0, 9000.0]])


def test_five_lone_tiles_far_apart_keep_their_predictions():
    values = np.arange(5, dtype=np.float32)[:, None]
    # the example: unbounded, these became [1, 1.5, 2, 2.5, 3]
    np.testing.assert_array_equal(smooth_all(values, FAR, pitch_um=STRIDE_UM), values)


def test_five_regions_far_apart_do_not_mix():
    # regions of 1..5 tiles on one 112 µm grid, each its own constant: nothing to blend within a
    # region, so any change would come from another region millimetres away
    xy = np.concatenate([tiles(1, size, origin) for size, origin in zip(range(1, 6), FAR)])
    values = np.repeat(np.arange(5, dtype=np.float32), range(1, 6))[:, None]
    assert grid_pitch(xy) == pytest.approx(STRIDE_UM)
    np.testing.assert_array_equal(smooth_all(values, xy), values)


def test_a_speck_far_from_a_core_is_unsmoothed():
    core = tiles(10, 10, (0.0, 0.0))
    xy = np.concatenate([core, [[6000.0, 500.0]]])  # a speck 5 mm from the core's edge
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(size=(len(core), 3)), [[10.0, -10.0, 5.0]]]).astype(np.float32)
    out = smooth_all(values, xy)
    np.testing.assert_array_equal(out[-1], values[-1])
    # the core smooths as it would alone, and it does smooth
    np.testing.assert_allclose(out[:-1], smooth_all(values[:-1], core), rtol=1e-6, atol=1e-6)
    assert not np.allclose(out[:-1], values[:-1])


def test_tma_cores_do_not_mix_but_smooth_within():
    # two 2 × 2-tile cores (256 µm stride) 1.5 mm apart: each tile has only 3 others in its core,
    # so its 6 nearest used to reach into the other core
    a, b = tiles(2, 2, (0.0, 0.0), pitch=256.0), tiles(2, 2, (1500.0, 0.0), pitch=256.0)
    xy = np.concatenate([a, b])
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(0, 1, (4, 2)), rng.normal(20, 1, (4, 2))]).astype(np.float32)
    out = smooth_all(values, xy)
    within = (0.5 * values[:4] + 0.5 * values[:4].mean(0), 0.5 * values[4:] + 0.5 * values[4:].mean(0))
    np.testing.assert_allclose(out, np.concatenate(within), rtol=1e-6, atol=1e-5)


def test_streamed_bounded_smoothing_equals_the_whole_slide():
    xy = np.concatenate([tiles(7, 9, (0.0, 0.0)), tiles(1, 1, (4000.0, 0.0)), tiles(3, 4, (0.0, 3000.0))])
    values = np.random.default_rng(2).normal(size=(len(xy), 4)).astype(np.float32)
    whole = smooth_all(values, xy)
    for size in (1, 5, 17):
        parts = (values[i : i + size] for i in range(0, len(values), size))
        np.testing.assert_array_equal(np.concatenate(list(smoothed(parts, xy, 0.5))), whole)


@pytest.mark.parametrize("layout", ["speck", "tma", "random"])
def test_the_knn_graph_has_no_edge_longer_than_the_bound(layout):
    if layout == "speck":
        xy = np.concatenate([tiles(10, 10, (0.0, 0.0)), [[6000.0, 500.0]]])
    elif layout == "tma":
        xy = np.concatenate([tiles(2, 2, (0.0, 0.0), pitch=256.0), tiles(2, 2, (1500.0, 0.0), pitch=256.0)])
    else:
        xy = np.random.default_rng(3).uniform(0, 3000, (200, 2))
    bound = MAX_EDGE_PITCHES * grid_pitch(xy)
    edges = knn_graph(xy, k=6)
    assert lengths(edges, xy).max() <= bound + 1e-6
    neighbours = knn_indices(xy, k=6)
    far = neighbours < 0
    assert far.any()  # the bound removed something the old graph had
    near = np.where(far, np.arange(len(xy))[:, None], neighbours)
    assert (np.hypot(*(xy[near] - xy[:, None]).transpose(2, 0, 1)) <= bound + 1e-6).all()


def test_the_bound_only_drops_the_long_edges_of_a_square_grid():
    xy = tiles(6, 6, (0.0, 0.0))
    interior = ((xy > 0) & (xy < 5 * STRIDE_UM)).all(axis=1)
    assert (knn_indices(xy, k=6)[interior] >= 0).all()  # 4 at one pitch, 2 √2 diagonals: all kept
    unbounded = knn_graph(xy, k=6, pitch_um=np.inf)
    short = unbounded[:, lengths(unbounded, xy) <= MAX_EDGE_PITCHES * STRIDE_UM]
    assert short.shape[1] < unbounded.shape[1]  # a border tile's 6 nearest reach 2 pitches
    np.testing.assert_array_equal(knn_graph(xy, k=6), short)


def test_stgchb_queries_never_reach_across_tissue():
    cfg = ModelConfig(
        method="stgchb",
        backbone="test_resnet",
        genes=tuple(f"g{i}" for i in range(4)),
        embed_dim=8,
        method_params={"hidden": 8, "layers": 2},
    )
    torch.manual_seed(0)
    model = create_model(cfg)
    n_features = model.image_encoder.num_features
    core = tiles(5, 5, (0.0, 0.0))
    xy = np.concatenate([core, [[5000.0, 300.0]]])
    features = np.random.default_rng(4).normal(size=(len(xy), n_features)).astype(np.float32)
    method = get_method("stgchb")
    both = np.concatenate(list(method.query_encoder(model, xy, device="cpu")([features])))
    speck = np.concatenate(list(method.query_encoder(model, xy[-1:], device="cpu")([features[-1:]])))
    core_alone = np.concatenate(list(method.query_encoder(model, core, device="cpu")([features[:-1]])))
    np.testing.assert_allclose(both[-1:], speck, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(both[:-1], core_alone, rtol=1e-5, atol=1e-6)


def test_a_gene_no_neighbour_measured_stays_missing_and_does_not_spread():
    """Issue 20.1 beside smoothing: NaN (no neighbour's dataset measured the gene) is missing, not a value."""
    from histoindex.impute import smoothed

    xy = np.array([[0.0, 0.0], [100.0, 0.0], [200.0, 0.0]])
    values = np.array([[1.0, 5.0], [np.nan, 7.0], [3.0, 9.0]], np.float32)
    out = np.concatenate(list(smoothed([values], xy, 0.5, pitch_um=100.0)))
    assert np.isnan(out[1, 0]) and np.isfinite(out[[0, 2], 0]).all()
    # position 0: own weight 0.5 + 0.5/deg over its neighbourhood {0, 1}; 1 is missing, so renormalised over {0}
    assert out[0, 0] == pytest.approx(1.0) and out[2, 0] == pytest.approx(3.0)
    complete = np.concatenate(list(smoothed([values[:, 1:]], xy, 0.5, pitch_um=100.0)))
    np.testing.assert_allclose(out[:, 1], complete[:, 0], rtol=1e-6)
