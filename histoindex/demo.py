"""The embedded default job: synthetic reference → train → ingest → query a held-out slide → SQL,
scored against the held-out truth. Uses only the public API, as a user's script would."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import api
from .metrics import mse, pearson_per_gene
from .synthetic import _SIGNATURES, make_section, write_section

MARKER = ".histoindex-demo"

#: the recipe users get (``TrainOptions()``: ImageNet EfficientNet-Lite0, frozen, 224 µm patches at
#: 224 px, 60 epochs of the heads, 4 views, Macenko); only the data are shrunk for a minute on two
#: CPU cores: sections of SECTION_PX px at 1 µm/px, a few hundred spots each
DEMO_TRAINING = api.TrainOptions()
SECTION_PX = 1600


@dataclass(frozen=True)
class DemoResult:
    db: Path
    heldout_r: float  # mean per-gene Pearson r over all model genes, held-out section
    heldout_r_markers: float  # the same over the cell-type signature genes in the panel
    mse_model: float
    mse_constant: float
    n_train_spots: int
    n_heldout_spots: int
    n_tiles: int
    sql_result: list[dict]
    seconds: float
    model_id: str


def run_demo(
    workdir: str | Path | None = None, *, training: api.TrainOptions = DEMO_TRAINING, device: str | None = None, log=print, progress=None
) -> DemoResult:
    """Run the whole pipeline on synthetic data in ``workdir`` (recreated on each run; None: a new
    temporary folder, kept for the user to look into). Nothing is written anywhere else.
    ``progress(step, done, total)`` is called as each long step advances (as the API's)."""
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="histoindex-demo-")) if workdir is None else Path(workdir)
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).exists():
            raise api.InputError(f"{workdir} exists and is not a histoindex demo folder; choose another --workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by `histoindex demo`; safe to delete\n")
    db = workdir / "histoindex.db"

    log("1/6 generating a synthetic reference section and a held-out section (pyramidal TIFF + h5ad)")
    written = []
    for i, (seed, name) in enumerate(((1, "synthetic-train"), (2, "synthetic-heldout"))):
        if progress is not None:
            progress("synthetic sections", i, 2)
        written.append(write_section(make_section(seed=seed, size_px=SECTION_PX), workdir, name=name))
    if progress is not None:
        progress("synthetic sections", 2, 2)
    (train_h5ad, _), (heldout_h5ad, heldout_tif) = written

    reference = api.read_reference(train_h5ad, platform="visium")
    recipe = "the default recipe" if training == api.TrainOptions() else "a recipe of the caller's"
    log(f"2/6 histoindex train {train_h5ad.name} --db {db}  ({recipe}; only the data are shrunk: {reference.n_obs} spots, for about a minute on 2 cores)")
    trained = api.train([reference], db=db, options=training, device=device, log=log, progress=progress)

    log(f"3/6 histoindex ingest {train_h5ad.name} --tissue breast --platform visium --db {db}")
    ingested = api.ingest(reference, db=db, tissue="breast", platform="visium", device=device, log=log, progress=progress)

    log(f"4/6 histoindex query {heldout_tif.name} --tissue breast --spots {heldout_h5ad.name} --out heldout_predictions.parquet")
    at_spots = api.query(
        heldout_tif, db=db, tissue="breast", spots=heldout_h5ad, out=workdir / "heldout_predictions.parquet", device=device, log=log, progress=progress
    )

    log(f"5/6 histoindex query {heldout_tif.name} --tissue breast --out slide_predictions.h5ad  (tissue tiles on a grid)")
    grid = api.query(heldout_tif, db=db, tissue="breast", out=workdir / "slide_predictions.h5ad", device=device, log=log, progress=progress)

    statement = (
        "SELECT slide, count(*) AS tiles, round(avg(value), 3) AS mean_FASN FROM predictions_long WHERE gene = 'FASN' GROUP BY slide, run_id ORDER BY tiles"
    )
    log(f'6/6 histoindex sql "{statement}"')
    rows = api.sql(statement, db=db).to_pylist()
    for line in _table(rows):
        log(f"    {line}")

    heldout = api.read_reference(heldout_h5ad, platform="visium")
    genes = list(at_spots.genes)
    truth = heldout.normalized(genes)
    order = {s: i for i, s in enumerate(at_spots.ids)}
    predicted = at_spots.predictions[[order[s] for s in heldout.obs_names]]
    train_mean = reference.normalized(genes).mean(axis=0)
    r = pearson_per_gene(truth, predicted)
    markers = [i for i, g in enumerate(genes) if any(g in sig for sig in _SIGNATURES.values())]
    result = DemoResult(
        db=db,
        heldout_r=float(r.mean()),
        heldout_r_markers=float(r[markers].mean()) if markers else float("nan"),
        mse_model=mse(truth, predicted),
        mse_constant=mse(truth, np.broadcast_to(train_mean, truth.shape)),
        n_train_spots=ingested.n_spots,
        n_heldout_spots=heldout.n_obs,
        n_tiles=grid.n_tiles,
        sql_result=rows,
        seconds=time.perf_counter() - started,
        model_id=trained.model_id,
    )
    (workdir / "demo_result.json").write_text(
        json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items()}, indent=2, default=str)
    )
    return result


def _table(rows: list[dict]) -> list[str]:
    """SQL result rows as a text table: a header, a rule, one aligned line per row."""
    if not rows:
        return ["(no rows)"]
    columns = list(rows[0])
    cells = [[str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()  # noqa: E731
    return [line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)]
