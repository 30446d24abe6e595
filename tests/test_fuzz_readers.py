"""Property-based fuzzing of every reader: random bytes under each reader's suffix (bare, or behind the
format's magic number so the parser gets further), Space Ranger folders of random files, positions
files for ``query --spots``, and small AnnData files with random shapes, dtypes and ``uns`` contents.

Every reader must either return its result or raise one of histoindex's own errors
(:class:`~histoindex.errors.HistoindexError`): never another exception, never a crash or a hang
(each example has a deadline). Deterministic (``derandomize``) so CI sees the same examples."""

from __future__ import annotations

import faulthandler
import gzip
import tempfile
import warnings
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from histoindex.errors import HistoindexError
from histoindex.io import open_slide, read_positions, read_reference
from histoindex.io.readers import check_reference_image
from histoindex.io.slides import image_mpp, image_overview

FUZZ = settings(
    max_examples=30,
    deadline=5000,  # ms per example: a hang fails the test instead of stalling CI
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

#: magic numbers that get a parser past its first check
MAGIC = {
    "hdf5": b"\x89HDF\r\n\x1a\n",
    "tiff": b"II*\x00",
    "bigtiff": b"II+\x00\x08\x00\x00\x00",
    "png": b"\x89PNG\r\n\x1a\n",
    "jpeg": b"\xff\xd8\xff\xe0",
    "gzip": b"\x1f\x8b\x08\x00",
    "parquet": b"PAR1",
}

payload = st.binary(min_size=0, max_size=4096)
prefix = st.sampled_from([b"", *MAGIC.values()])


def _expect_own_errors(fn, *args, **kwargs):
    """Run a reader: a result or a HistoindexError are fine; anything else fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return fn(*args, **kwargs)
        except HistoindexError:
            return None


@pytest.fixture(autouse=True)
def no_hang():
    """The deadline fails slow examples once they return; a reader stuck inside a C library never
    returns, so a watchdog dumps every thread's stack and ends the run instead of stalling CI."""
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    """A small valid H&E-like image for readers that need one beside random data."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("fuzz-image") / "he.png"
    Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(path)
    return path


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@FUZZ
@given(head=prefix, body=payload, suffix=st.sampled_from([".h5ad", ".tsv.gz", ".csv", ".tsv", ".csv.gz"]))
def test_random_reference_files(image, head, body, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), f"ref{suffix}", head + body)
        table = _write(Path(tmp), "spots.tsv", body)
        _expect_own_errors(read_reference, path, image=image, spot_table=table)
        _expect_own_errors(read_reference, path)


@FUZZ
@given(head=prefix, body=payload, suffix=st.sampled_from([".svs", ".tif", ".tiff", ".ndpi", ".jpg", ".png"]))
def test_random_slides(head, body, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), f"slide{suffix}", head + body)
        _expect_own_errors(image_mpp, path)
        _expect_own_errors(image_overview, path, max_side=64)
        slide = _expect_own_errors(open_slide, path, mpp=0.5)
        if slide is not None:
            try:
                _expect_own_errors(slide.thumbnail, 64)
                _expect_own_errors(slide.read_region, 0, 0, 32, 16)
            finally:
                slide.close()


SPACERANGER_FILES = [
    "filtered_feature_bc_matrix.h5",
    "spatial/tissue_positions_list.csv",
    "spatial/tissue_positions.csv",
    "spatial/scalefactors_json.json",
    "spatial/tissue_hires_image.png",
]


@FUZZ
@given(files=st.dictionaries(st.sampled_from(SPACERANGER_FILES), st.tuples(prefix, payload), min_size=1))
def test_random_spaceranger_folders(image, files):
    with tempfile.TemporaryDirectory() as tmp:
        outs = Path(tmp) / "outs"
        outs.mkdir()
        for name, (head, body) in files.items():
            _write(outs, name, head + body)
        _expect_own_errors(read_reference, outs)
        _expect_own_errors(read_reference, outs, image=image)


def _spaceranger_folder(outs: Path, draw) -> None:
    """A Space Ranger 1.x outs/ folder whose files are each valid, damaged, or valid in form with
    random values, as ``draw`` decides."""
    import h5py

    n_spots, n_genes = draw(st.integers(0, 6)), draw(st.integers(0, 4))
    spatial = outs / "spatial"
    spatial.mkdir(parents=True)
    barcodes = [f"AAAC{i}-1" for i in range(n_spots)]
    kind = draw(st.sampled_from(["valid", "random", "values"]))
    matrix = outs / "filtered_feature_bc_matrix.h5"
    if kind == "random":
        matrix.write_bytes(draw(prefix) + draw(payload))
    else:
        counts = draw(hnp.arrays(draw(st.sampled_from([np.int32, np.float32, np.float64])), (n_genes, n_spots)))
        with h5py.File(matrix, "w") as f:
            m = f.create_group("matrix")
            csc = __import__("scipy.sparse", fromlist=["csc_matrix"]).csc_matrix(counts if kind == "valid" else counts * 0 + counts)
            m["data"], m["indices"], m["indptr"] = csc.data, csc.indices, csc.indptr
            m["shape"] = np.array(draw(st.sampled_from([(n_genes, n_spots), (n_genes + 1, n_spots), (0, 0)])), np.int64)
            m["barcodes"] = np.array(barcodes if kind == "valid" else [draw(st.sampled_from(barcodes or ["x"])) for _ in barcodes], dtype="S")
            features = m.create_group("features")
            features["name"] = np.array([f"G{i % draw(st.integers(1, 4))}" for i in range(n_genes)], dtype="S")
            if draw(st.booleans()):
                features["feature_type"] = np.array([draw(st.sampled_from(["Gene Expression", "Antibody Capture"])) for _ in range(n_genes)], dtype="S")
    number = st.one_of(st.integers(-3, 3000).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str), st.text(max_size=4))
    rows = [[b, draw(st.sampled_from(["1", "0", "x"])), *(draw(number) for _ in range(4))] for b in barcodes]
    rows += [draw(st.lists(number, max_size=7)) for _ in range(draw(st.integers(0, 2)))]
    (spatial / "tissue_positions_list.csv").write_text("\n".join(",".join(r) for r in rows))
    scale = draw(st.dictionaries(st.sampled_from(["spot_diameter_fullres", "tissue_hires_scalef"]), st.one_of(st.floats(allow_nan=False), st.text(max_size=3))))
    (spatial / "scalefactors_json.json").write_text(__import__("json").dumps(scale) if draw(st.booleans()) else draw(st.text(max_size=20)))
    if draw(st.booleans()):
        shape = draw(st.sampled_from([(8, 8, 3), (1, 1, 3), (8, 8)]))
        Image.fromarray(draw(hnp.arrays(np.uint8, shape))).save(spatial / "tissue_hires_image.png")


@FUZZ
@given(data=st.data(), with_image=st.booleans(), mpp=st.sampled_from([None, 0.5]))
def test_spaceranger_folders_with_random_values(image, data, with_image, mpp):
    with tempfile.TemporaryDirectory() as tmp:
        outs = Path(tmp) / "outs"
        _spaceranger_folder(outs, data.draw)
        spots = _expect_own_errors(read_reference, outs, image=image if with_image else None, mpp=mpp)
        if spots is not None:
            _expect_own_errors(check_reference_image, spots, patch_um=55.0)
            _expect_own_errors(spots.normalized, list(spots.var_names[:2]))


text_cell = st.one_of(st.integers(-(10**6), 10**6).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str), st.text(max_size=8))


@FUZZ
@given(
    raw=st.tuples(prefix, payload),
    header=st.lists(st.sampled_from(["spot", "x", "y", "z", ""]), max_size=4),
    rows=st.lists(st.lists(text_cell, min_size=0, max_size=4), max_size=6),
    suffix=st.sampled_from([".csv", ".parquet", ".h5ad"]),
)
def test_random_positions_files(raw, header, rows, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        _expect_own_errors(read_positions, _write(Path(tmp), f"raw{suffix}", raw[0] + raw[1]))
        text = "\n".join(",".join(r) for r in [header, *rows])
        _expect_own_errors(read_positions, _write(Path(tmp), "table.csv", text.encode()))
        try:
            frame = pd.DataFrame([r + [""] * (len(header) - len(r)) for r in rows], columns=header or None)
        except Exception:
            return
        if header and len(set(header)) == len(header) and all(header):
            parquet = Path(tmp) / "table.parquet"
            frame.to_parquet(parquet)
            _expect_own_errors(read_positions, parquet)


dtypes = st.sampled_from([np.float32, np.float64, np.int32, np.int64, np.uint8, np.bool_])


@st.composite
def matrices(draw, shape):
    """Expression: usually counts (small non-negative integers), else anything of a random dtype."""
    if draw(st.booleans()):
        return draw(hnp.arrays(draw(st.sampled_from([np.int32, np.int64, np.float32])), shape, elements=st.integers(0, 50)))
    return draw(hnp.arrays(draw(dtypes), shape))


@st.composite
def small_anndata(draw):
    """Mostly well-formed (so reading gets deep), each part sometimes wrong: shapes, dtypes, NaN,
    repeated names, several libraries, odd scale factors and hires images."""
    usually = st.sampled_from([True, True, True, False])
    n_obs = draw(st.integers(3, 6) | st.integers(0, 6))
    n_vars = draw(st.integers(2, 5) | st.integers(0, 5))
    X = draw(matrices((n_obs, n_vars)))
    adata = anndata.AnnData(X=X)
    unique_obs, unique_var = draw(usually), draw(usually)
    adata.obs_names = [f"s{i}" if unique_obs else f"s{i % 2}" for i in range(n_obs)]
    adata.var_names = [f"G{i}" if unique_var else f"G{i % 2}" for i in range(n_vars)]
    if draw(usually):
        width = draw(st.sampled_from([2, 2, 2, 3, 1, 0]))
        inside = st.floats(0, 255) if draw(usually) else st.floats(allow_nan=True, allow_infinity=True)
        adata.obsm["spatial"] = draw(hnp.arrays(np.float64, (n_obs, width), elements=inside))
    if draw(st.booleans()):
        adata.obs["array_row"] = draw(hnp.arrays(np.float64, (n_obs,)))
        adata.obs["array_col"] = draw(hnp.arrays(np.int64, (n_obs,)))
    if draw(st.booleans()):
        scalar = st.one_of(st.floats(allow_nan=True), st.integers(-5, 5), st.text(max_size=5))
        library = {
            "scalefactors": draw(st.dictionaries(st.sampled_from(["spot_diameter_fullres", "tissue_hires_scalef"]), scalar)),
            "metadata": draw(st.dictionaries(st.just("source_image_path"), st.text(max_size=10))),
        }
        if draw(st.booleans()):
            library["images"] = {"hires": draw(hnp.arrays(np.uint8, draw(st.sampled_from([(4, 4, 3), (4, 4), (0, 3, 3)]))))}
        adata.uns["spatial"] = {"lib": library}
        if not draw(usually):
            adata.uns["spatial"]["other"] = {"scalefactors": {}}
    if draw(st.booleans()) and n_obs and n_vars:
        adata.layers["counts"] = draw(matrices((n_obs, n_vars)))
    return adata


@FUZZ
@given(
    adata=small_anndata(), with_image=st.sampled_from([True, True, False]), mpp=st.sampled_from([0.5, None, -1.0, float("nan")]), log_normalised=st.booleans()
)
def test_random_small_anndata(image, adata, with_image, mpp, log_normalised):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "random.h5ad"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                adata.write_h5ad(path)
            except Exception:  # anndata itself refuses to write some of these: nothing to read
                return
        spots = _expect_own_errors(read_reference, path, image=image if with_image else None, mpp=mpp, log_normalised=log_normalised)
        if spots is not None:  # what ingest does next: the image under the spots, and the expression
            _expect_own_errors(check_reference_image, spots, patch_um=55.0)
            _expect_own_errors(spots.normalized, list(spots.var_names[:2]))
        _expect_own_errors(read_positions, path)


@FUZZ
@given(
    keys=st.lists(st.tuples(st.integers(-2, 30), st.integers(-2, 30)), max_size=8),
    genes=st.lists(st.sampled_from(["FASN", "VIM", "G", ""]), max_size=4),
    cells=st.lists(text_cell, min_size=64, max_size=64),
    columns=st.permutations(["x", "y", "pixel_x", "pixel_y", "selected"]) | st.lists(st.sampled_from(["x", "y", "pixel_x", "pixel_y", "G"]), max_size=5),
)
def test_random_st_tables(image, keys, genes, cells, columns):
    """Legacy ST counts and spot tables shaped right, holding anything: keys, repeated genes, text,
    NaN, negative and huge numbers."""
    with tempfile.TemporaryDirectory() as tmp:
        cell = iter(cells * 8)
        counts = ["\t".join(["", *genes])] + ["\t".join([f"{x}x{y}", *(next(cell) for _ in genes)]) for x, y in keys]
        table = ["\t".join(columns)] + ["\t".join(str(x) if c == "x" else str(y) if c == "y" else next(cell) for c in columns) for x, y in keys]
        counts_path = _write(Path(tmp), "C1.tsv.gz", gzip.compress("\n".join(counts).encode()))
        table_path = _write(Path(tmp), "C1_selection.tsv", "\n".join(table).encode())
        _expect_own_errors(read_reference, counts_path, spot_table=table_path, image=image, mpp=0.5)
        _expect_own_errors(read_reference, counts_path, spot_table=table_path, image=image)
