"""Any gene the references measured can be predicted (issue 20, items 1 and 2): the imputation
panel (every gene a reference measured, stored per spot) is apart from the training panel (the
genes the expression encoder sees); a reference lacking some training-panel genes is still ingested
(zero-filled for its embedding, stored as not measured on a targeted platform), and a gene only
some references measured is averaged over the neighbours from those."""

from __future__ import annotations

import json
import shutil

import anndata
import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from histoindex import api
from histoindex.config import RetrievalSettings
from histoindex.impute import impute_measured
from histoindex.search import References, Scope, search
from histoindex.store import Store
from histoindex.synthetic import gene_names

from .conftest import error_line, run

EXTRA = "ONLYHERE"  # a gene only the second (targeted-panel) reference measured


def _panel(db) -> list[str]:
    return list(Store(db).model().cfg.genes)


def _outside(db) -> list[str]:
    """Synthetic genes the model was not trained on (the train section measured them all)."""
    panel = set(_panel(db))
    return [g for g in gene_names() if g not in panel]


def _partial_h5ad(sections, tmp_path, drop: list[str]):
    """The 'other' section without the genes ``drop`` and with one gene of its own (EXTRA)."""
    adata = anndata.read_h5ad(sections.other_h5ad)
    kept = adata[:, [g for g in adata.var_names if g not in drop]].copy()
    rng = np.random.default_rng(0)
    extra = rng.poisson(3.0, size=(kept.n_obs, 1)).astype(kept.X.dtype)
    X = sp.hstack([sp.csr_matrix(kept.X), sp.csr_matrix(extra)], format="csr") if sp.issparse(kept.X) else np.hstack([kept.X, extra])
    grown = anndata.AnnData(X=X, obs=kept.obs.copy(), var=anndata.AnnData(X=np.zeros((1, kept.n_vars + 1))).var)
    grown.var_names = [*map(str, kept.var_names), EXTRA]
    grown.obsm["spatial"] = kept.obsm["spatial"]
    grown.uns["spatial"] = kept.uns["spatial"]
    path = tmp_path / "partial.h5ad"
    grown.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def grown(trained_store, sections, tmp_path_factory):
    """The trained store plus a second reference on a targeted platform (xenium) that lacks four
    of the model's genes and one gene outside it, and measured one gene nobody else did (read only)."""
    tmp_path = tmp_path_factory.mktemp("grown")
    store = tmp_path / "db"
    shutil.copytree(trained_store, store)
    panel, outside = _panel(store), _outside(store)
    dropped_panel, dropped_outside = panel[-4:], outside[:1]
    partial = _partial_h5ad(sections, tmp_path, dropped_panel + dropped_outside)
    result = run("ingest", partial, "--tissue", "breast", "--platform", "xenium", "--dataset", "partial", "--mpp", "1.0", "--db", store)
    return store, partial, dropped_panel, dropped_outside, result


def test_a_reference_missing_panel_genes_is_ingested_with_a_warning(grown):
    db, _, dropped_panel, _, result = grown
    panel = _panel(db)
    assert f"warning: partial lacks 4 of the model's {len(panel)} genes ({', '.join(dropped_panel)})" in result.output
    assert "zero-filled for its expression embedding; stored as not measured (platform xenium is a targeted panel)" in result.output
    rows = Store(db).table("spots").search().where("dataset = 'partial'").select(["expression"]).limit(None).to_arrow()
    expression = np.stack([np.asarray(v, np.float32) for v in rows.column("expression").to_pylist()])
    missing = [panel.index(g) for g in dropped_panel]
    assert np.isnan(expression[:, missing]).all(), "a gene the dataset did not measure is stored as missing, not zero"
    assert not np.isnan(np.delete(expression, missing, axis=1)).any()
    info = {d["dataset"]: d["genes"] for d in api.info(db=db)["datasets"]}
    assert info == {"train": len(gene_names()), "partial": len(gene_names()) - 5 + 1}  # info: how many genes each dataset can answer
    assert "genes" in run("info", "--db", db).output


def test_too_small_an_overlap_is_refused_naming_the_threshold(store, sections, tmp_path):
    panel = _panel(store)
    partial = _partial_h5ad(sections, tmp_path, panel[: len(panel) // 2 + 1])
    result = run("ingest", partial, "--tissue", "breast", "--platform", "xenium", "--dataset", "few", "--mpp", "1.0", "--db", store, ok=False)
    error_line(result, f"lacks {len(panel) // 2 + 1} of the model's {len(panel)} genes", "at least 50% of them", "histoindex train --genes FILE")


def test_a_whole_transcriptome_reference_missing_panel_genes_stores_zeros(store, sections, tmp_path):
    """Visium / ST matrices leave out genes with no counts: those are measured zeros."""
    panel = _panel(store)
    partial = _partial_h5ad(sections, tmp_path, panel[-2:])
    result = run("ingest", partial, "--tissue", "breast", "--platform", "visium", "--dataset", "wt", "--db", store)
    assert "lacks 2 of the model's" in result.output and "stored as measured zeros (platform visium measures the whole transcriptome" in result.output
    rows = Store(store).table("spots").search().where("dataset = 'wt'").select(["expression"]).limit(None).to_arrow()
    expression = np.stack([np.asarray(v, np.float32) for v in rows.column("expression").to_pylist()])
    assert (expression[:, [panel.index(g) for g in panel[-2:]]] == 0).all()


def test_a_gene_outside_the_training_panel_is_predicted_and_plotted(store, sections, tmp_path):
    gene = _outside(store)[0]
    first = _panel(store)[0]
    out = tmp_path / "p.parquet"
    result = run("query", sections.heldout_tif, "--tissue", "breast", "--genes", f"{gene},{first}", "--out", out, "--plot", gene, "--db", store)
    assert (tmp_path / f"p.{gene}.png").stat().st_size > 0
    assert "× 2 genes" in result.output
    table = pq.read_table(out)
    assert [c for c in table.column_names if c in (gene, first)] == [gene, first]
    values = table.column(gene).to_numpy()
    assert np.isfinite(values).all() and values.std() > 0
    run("plot", out, "--gene", gene, "--out", tmp_path / "again.png")
    # the predictions table and SQL's long view know the run's genes
    long = run("sql", "SELECT gene, count(*) AS n FROM predictions_long GROUP BY gene ORDER BY gene", "--db", store, "--format", "json")
    counts = {r["gene"]: r["n"] for r in json.loads(long.stdout)}
    assert counts == {gene: len(values), first: len(values)}
    # --plot alone predicts the gene drawn besides the panel; a gene nobody measured is an error naming it
    result = run("query", sections.heldout_tif, "--tissue", "breast", "--out", tmp_path / "q.h5ad", "--plot", gene, "--db", store)
    assert anndata.read_h5ad(tmp_path / "q.h5ad").var_names[-1] == gene
    result = run("query", sections.heldout_tif, "--tissue", "breast", "--genes", "NOPE,FASN", "--db", store, ok=False)
    error_line(result, "gene NOPE measured by none of the references searched (train;")


def _truth(db, sections, partial) -> dict[str, tuple[list[str], np.ndarray]]:
    """Each dataset's measured genes and log1p(CP10k) profiles, from its file, keyed by spot id."""
    out = {}
    for name, path in (("train", sections.train_h5ad), ("partial", partial)):
        ref = api.read_reference(path, mpp=1.0) if name == "partial" else api.read_reference(path)
        out[name] = ({str(s): i for i, s in enumerate(ref.obs_names)}, [str(g) for g in ref.var_names], ref.normalized())
    return out


@pytest.mark.parametrize(("tau", "mode"), [(0.0, "exact"), (0.05, "ann")])  # profiles held in memory / read by row id
def test_a_gene_some_references_measured_is_averaged_over_those_only(grown, sections, tau, mode):
    """Checked against the formula: per query and gene, sum_j w_j m_jg v_jg / sum_j w_j m_jg over its
    k neighbours j (w_j = exp((s_j - max s) / tau), or 1; m_jg = 1 where j's dataset measured g),
    with the count sum_j m_jg."""
    db, partial, dropped_panel, dropped_outside, _ = grown
    store = Store(db)
    record = store.model()
    genes = [dropped_panel[0], dropped_outside[0], EXTRA, record.cfg.genes[0]]
    refs = References(store, Scope(model_id=record.model_id), mode=mode, genes=genes)
    assert refs.measured_by == {dropped_panel[0]: ["train"], dropped_outside[0]: ["train"], EXTRA: ["partial"], record.cfg.genes[0]: ["partial", "train"]}
    queries = store.table("spots").search().select(["image_embedding"]).limit(40).to_arrow()
    queries = np.stack([np.asarray(v, np.float32) for v in queries.column("image_embedding").to_pylist()])
    hits = search(refs, queries, k=12)
    values, counts = impute_measured(hits, refs, RetrievalSettings(k=12, tau=tau, impute="log"))

    rows = store.table("spots").search().select(["dataset", "spot_id"]).with_row_id(True).limit(None).to_arrow()
    where = dict(zip(rows.column("_rowid").to_pylist(), zip(rows.column("dataset").to_pylist(), rows.column("spot_id").to_pylist())))
    truth = _truth(db, sections, partial)
    expected = np.full(values.shape, np.nan)
    expected_counts = np.zeros(values.shape, int)
    for q in range(len(queries)):
        s = hits.similarities[q].astype(np.float64)
        w = np.exp((s - s.max()) / tau) if tau > 0 else np.ones_like(s)
        for g, gene in enumerate(genes):
            num = den = 0.0
            for j, row in enumerate(hits.indices[q]):
                dataset, spot = where[int(row)]
                spots, measured, profiles = truth[dataset]
                if gene in measured:
                    num += w[j] * profiles[spots[spot], measured.index(gene)]
                    den += w[j]
                    expected_counts[q, g] += 1
            if den > 0:
                expected[q, g] = num / den
    assert (expected_counts == counts).all()
    assert 0 < expected_counts[:, 0].min() or np.isnan(values[expected_counts[:, 0] == 0, 0]).all()
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert (expected_counts < 12).any(), "some query mixes neighbours of both datasets"

    # the training panel's own path (no --genes) follows the same rule for the genes 'partial' lacks
    default = References(store, Scope(model_id=record.model_id), mode=mode)
    panel_values, _ = impute_measured(hits, default, RetrievalSettings(k=12, tau=tau, impute="log"))
    np.testing.assert_allclose(panel_values[:, record.cfg.genes.index(dropped_panel[0])], values[:, 0], rtol=1e-5, atol=1e-6, equal_nan=True)


def test_z_imputation_uses_per_dataset_stats_over_measured_genes(grown):
    db, _, dropped_panel, _, _ = grown
    store = Store(db)
    record = store.model()
    refs = References(store, Scope(model_id=record.model_id), mode="ann", genes=[dropped_panel[0], EXTRA])
    stats = refs.dataset_stats()
    codes = dict(refs._dataset_index)
    assert np.isnan(stats.mean[codes["partial"], 0]) and np.isfinite(stats.mean[codes["train"], 0])
    assert np.isnan(stats.mean[codes["train"], 1]) and np.isfinite(stats.mean[codes["partial"], 1])
    assert np.isfinite(stats.pooled_mean).all() and np.isfinite(stats.pooled_sd).all()
