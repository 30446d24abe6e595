"""`query --out x.geojson`: QuPath-ready GeoJSON, checked against the shape QuPath's import reads
(File > Import objects / `importObjectsFromFile`): a FeatureCollection of Features whose
`properties.objectType` is one of QuPath's object types and whose `properties.measurements` maps
measurement names to numbers, in level-0 pixel coordinates."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from histoindex.store import Store

from .conftest import run

QUPATH_OBJECT_TYPES = {"annotation", "detection", "tile", "cell", "tma_core", "root"}


def _check_qupath_shape(collection: dict, genes: list[str]) -> None:
    assert collection["type"] == "FeatureCollection"
    for feature in collection["features"]:
        assert feature["type"] == "Feature"
        assert feature["geometry"]["type"] in {"Point", "Polygon"}
        props = feature["properties"]
        assert props["objectType"] in QUPATH_OBJECT_TYPES
        assert isinstance(props["name"], str)
        measurements = props["measurements"]
        assert list(measurements) == genes
        assert all(isinstance(v, float) and np.isfinite(v) for v in measurements.values())


def test_grid_query_writes_tiles_as_squares_with_the_genes_as_measurements(store, sections, tmp_path):
    geo, parquet = tmp_path / "grid.geojson", tmp_path / "grid.parquet"
    run("query", sections.heldout_tif, "--tissue", "breast", "--out", geo, "--k", "10", "--db", store)
    run("query", sections.heldout_tif, "--tissue", "breast", "--out", parquet, "--k", "10", "--db", store)
    genes = list(Store(store).model().cfg.genes)
    collection = json.loads(geo.read_text())
    _check_qupath_shape(collection, genes)
    frame = pl.read_parquet(parquet)
    features = collection["features"]
    assert len(features) == frame.height > 50
    assert [f["properties"]["name"] for f in features] == frame["tile_id"].to_list()
    assert {f["properties"]["objectType"] for f in features} == {"tile"}
    # each tile is the square cell of the grid around its centre (the stride: 100 µm, the Visium
    # references' spot pitch; its window, the model's 110 µm patch, overlaps its neighbours'), level-0 pixels
    assert collection["histoindex"]["stride_um"] == 100.0 < collection["histoindex"]["patch_um"]
    side = collection["histoindex"]["stride_um"] / collection["histoindex"]["mpp"]
    rings = np.array([f["geometry"]["coordinates"][0] for f in features])  # n × 5 × 2
    assert rings.shape[1:] == (5, 2) and np.allclose(rings[:, 0], rings[:, 4])
    np.testing.assert_allclose(rings[:, 2] - rings[:, 0], side)
    np.testing.assert_allclose(rings[:, :4].mean(axis=1), frame.select("x", "y").to_numpy())
    values = np.array([list(f["properties"]["measurements"].values()) for f in features])
    np.testing.assert_allclose(values, frame.select(genes).to_numpy(), atol=1e-4 / 2 + 1e-6)
    assert collection["histoindex"]["model_id"] == Store(store).model().model_id
    # the provenance is JSON, as in the Parquet file's metadata: nested values are objects, not Python reprs
    provenance = collection["histoindex"]
    in_parquet = json.loads(pq.read_schema(parquet).metadata[b"histoindex"])
    assert isinstance(provenance["retrieval"], dict) and provenance["retrieval"]["k"] == 10
    skip = {"run_id", "created_at"}
    assert {k: v for k, v in provenance.items() if k not in skip} == {k: v for k, v in in_parquet.items() if k not in skip}


def test_spot_query_writes_points(store, sections, tmp_path):
    geo = tmp_path / "spots.geojson"
    run("query", sections.heldout_tif, "--tissue", "breast", "--spots", sections.heldout_h5ad, "--out", geo, "--db", store)
    collection = json.loads(geo.read_text())
    _check_qupath_shape(collection, list(Store(store).model().cfg.genes))
    (kind,) = {f["geometry"]["type"] for f in collection["features"]}
    assert kind == "Point"
    assert all(f["properties"]["radius"] > 0 for f in collection["features"])


def test_plot_needs_a_table_output(store, sections, tmp_path):
    result = run("query", sections.heldout_tif, "--out", tmp_path / "x.geojson", "--plot", "FASN", "--db", store, ok=False)
    assert result.exit_code != 0
    assert "--plot draws from a .parquet or .h5ad --out, not x.geojson" in result.output
    assert not (tmp_path / "x.geojson").exists()


def test_a_missing_gene_is_left_out_of_the_measurements_and_the_file_stays_json(tmp_path):
    """A gene no neighbour's dataset measured is NaN in the predictions: GeoJSON has no NaN, so it is left out."""
    import json as _json

    import numpy as _np

    from histoindex.io.write import PredictionWriter

    out = tmp_path / "x.geojson"
    writer = PredictionWriter(out, id_column="tile_id", slide="s.tif", mpp=0.5, genes=["A", "B"], provenance={"patch_um": 100.0, "stride_um": 100.0})
    writer.write(_np.array(["t0", "t1"]), _np.array([[10.0, 10.0], [210.0, 10.0]]), _np.array([[1.0, _np.nan], [2.0, 3.0]], _np.float32))
    writer.close()
    features = _json.loads(out.read_text())["features"]  # strict JSON: a NaN would not parse as standard JSON
    assert features[0]["properties"]["measurements"] == {"A": 1.0}
    assert features[1]["properties"]["measurements"] == {"A": 2.0, "B": 3.0}
    assert "NaN" not in out.read_text()
