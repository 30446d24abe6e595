"""What the README and the help promise, measured: help texts that agree with the model's defaults,
`info` that keeps model ids whole in a pipe, progress in a log file that is time-based."""

from __future__ import annotations

import re

from histoindex import api
from histoindex.recipe import TrainOptions

from .conftest import run


def test_query_help_gives_the_default_recipes_views():
    """`query --help`, `train --help` and the recipe agree on the views averaged per tile."""
    views = TrainOptions().views
    query_help = " ".join(run("query", "--help").output.split())
    assert f"{views} for the default recipe" in query_help, query_help
    assert re.search(rf"--views INTEGER RANGE .*\[default: {views};", " ".join(run("train", "--help").output.split()))


def test_info_keeps_model_ids_whole_when_piped(trained_store):
    """A pipe (CliRunner is not a terminal) gets every model id in full, never cut with an ellipsis."""
    result = run("info", "--db", trained_store)
    ids = [m["model_id"] for m in api.info(db=trained_store)["models"]]
    assert ids
    table = result.output.split("models", 1)[1]
    for model_id in ids:
        assert model_id in table.split(f"{model_id}:")[0], result.output  # in the models table itself
    assert "…" not in result.output, result.output


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_progress_in_a_log_file_is_a_line_every_ten_seconds_by_the_clock():
    """Non-tty progress: a line when a step has said nothing for 10 s, even between two of the API's
    calls (a slow 64-tile batch), and one at the end; never more often than every 10 s."""
    from histoindex.cli import ProgressBars

    clock, lines = _Clock(), []
    bars = ProgressBars(plain=True, clock=clock, write=lines.append)
    bars("tiles", 0, 256)
    for _ in range(9):  # a batch every second: one line in 10 s, not nine
        clock.now += 1
        bars.tick()
    bars("tiles", 64, 256)
    assert lines == []
    clock.now += 1  # 10 s since the step began, 64 tiles done: a line, though no call came
    bars.tick()
    assert lines == ["tiles: 64/256 (6.4 tiles/s)"]
    clock.now += 5
    bars.tick()
    bars("tiles", 128, 256)
    assert len(lines) == 1  # at most every 10 s
    clock.now += 25  # a 30 s batch: the clock still says how far it is
    for _ in range(25):
        bars.tick()
    assert lines[1:] == ["tiles: 128/256 (3.2 tiles/s)"]
    bars("tiles", 256, 256)  # the end: always a line
    assert lines[-1] == "tiles: 256/256 (6.4 tiles/s)"
    n = len(lines)
    clock.now += 60
    bars.tick()
    assert len(lines) == n  # a finished step says nothing more


def test_progress_rates_under_one_per_second_keep_their_decimals():
    from histoindex.cli import ProgressBars

    clock, lines = _Clock(), []
    bars = ProgressBars(plain=True, clock=clock, write=lines.append)
    bars("tiles", 0, 10)
    clock.now += 40
    bars("tiles", 10, 10)
    assert lines == ["tiles: 10/10 (0.25 tiles/s)"]


def test_the_features_bar_of_several_sections_counts_all_their_spots(sections, tmp_path):
    """Training on two sections: one "backbone features" count from 0 to both sections' spots."""
    options = TrainOptions(backbone="test_resnet", weights="", patch_px=32, patch_um=110.0, epochs=1, n_genes=20, batch_size=16, inner_check=False)
    references = [api.read_reference(path, platform="visium") for path in (sections.train_h5ad, sections.heldout_h5ad)]
    calls = []
    api.train(references, db=tmp_path / "db", options=options, progress=lambda step, done, total: calls.append((step, done, total)))
    features = [(done, total) for step, done, total in calls if step == "backbone features"]
    everything = sum(r.n_obs for r in references)
    assert {total for _, total in features} == {everything}
    assert [done for done, _ in features] == sorted(done for done, _ in features)  # never restarts
    assert features[0][0] == 0 and features[-1][0] == everything


def test_query_says_what_it_does_from_its_first_moment(trained_store, sections, tmp_path):
    """Loading the libraries, the store and the model takes seconds: the first line comes before."""
    import shutil

    db = tmp_path / "db"
    shutil.copytree(trained_store, db)
    result = run("query", sections.heldout_tif, "--tissue", "breast", "--out", tmp_path / "p.parquet", "--db", db)
    assert result.stderr.splitlines()[0] == f"query {sections.heldout_tif}: opening the store, loading the model…", result.stderr
