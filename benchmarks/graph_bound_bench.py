"""The spatial-graph bound of issue 19 on HER2ST: what it removes, and what it does to held-out scores.

    # the h5ad sections, as benchmarks/her2st_eval.sh makes them
    .venv/bin/python examples/her2st_to_h5ad.py --her2st ../shared/data/her2st --out /tmp/h19/h5ad
    # edges of the 6-NN graphs (smoothing's, ST-GCHB's) the bound removes, per section
    .venv/bin/python benchmarks/graph_bound_bench.py edges /tmp/h19/h5ad
    # one `histoindex evaluate` per bound (inf = unbounded, the code before issue 19), in ONE process,
    # so every run has the same code; scores go to OUTDIR/bound-<factor>.json
    .venv/bin/python benchmarks/graph_bound_bench.py compare OUTDIR inf,1.75 -- EVALUATE ARGUMENTS...

The bound is :data:`histoindex.graph.MAX_EDGE_PITCHES`, set before each run.
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

import histoindex.graph as graph  # noqa: E402

SECTIONS = ("B4", "C2", "C3", "C4", "C5")


def edges(h5ad: str) -> None:
    from histoindex.io.readers import read_reference

    warnings.simplefilter("ignore")  # pixel-size notes
    removed = total = changed = spots = 0
    for name in SECTIONS:
        ref = read_reference(f"{h5ad}/{name}.h5ad", platform="st")
        xy = ref.xy * ref.mpp
        pitch = graph.grid_pitch(xy)
        bounded, unbounded = graph.knn_graph(xy, k=6), graph.knn_graph(xy, k=6, pitch_um=np.inf)
        gone = unbounded[:, ~np.isin(unbounded[0] * len(xy) + unbounded[1], bounded[0] * len(xy) + bounded[1])]
        lengths = np.hypot(*(xy[gone[0]] - xy[gone[1]]).T) / pitch
        moved = np.bincount(bounded[1], minlength=len(xy)) != np.bincount(unbounded[1], minlength=len(xy))
        n_edges = unbounded.shape[1] - len(xy)  # without self-loops
        span = f"{lengths.min():.2f}-{lengths.max():.2f} pitches" if len(lengths) else "none"
        print(
            f"{name}: {len(xy)} spots, pitch {pitch:.1f} µm, bound {graph.MAX_EDGE_PITCHES * pitch:.1f} µm: "
            f"{gone.shape[1]} of {n_edges} directed edges removed ({gone.shape[1] / n_edges:.1%}; {span}); "
            f"{moved.sum()} spots' neighbourhoods change; {(np.bincount(bounded[1], minlength=len(xy)) == 1).sum()} left alone"
        )
        removed, total, changed, spots = removed + gone.shape[1], total + n_edges, changed + moved.sum(), spots + len(xy)
    print(f"all: {removed} of {total} edges removed ({removed / total:.1%}); {changed} of {spots} spots' neighbourhoods change")


def compare(out: str, factors: str, args: list[str]) -> None:
    from histoindex.cli import cli

    for factor in (float(f) for f in factors.split(",")):
        graph.MAX_EDGE_PITCHES = factor
        start = time.time()
        with open(f"{out}/bound-{factor:g}.json", "w") as f, contextlib.redirect_stdout(f):
            cli.main(["evaluate", *args, "--out", f"{out}/bound-{factor:g}.parquet"], standalone_mode=False)
        print(f"# bound {factor:g} pitches: {time.time() - start:.0f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["edges"]:
        edges(sys.argv[2])
    elif sys.argv[1:2] == ["compare"] and "--" in sys.argv:
        compare(sys.argv[2], sys.argv[3], sys.argv[sys.argv.index("--") + 1 :])
    else:
        sys.exit(__doc__)
