"""A store whose files were removed under it (a disk cleaned by hand, a sync that lost files): every
command that reads the store ends in one clear line and a non-zero exit, never a traceback, and the
line carries the library's own reason."""

from __future__ import annotations

import pytest

from .conftest import error_line, run

#: commands that read only the manifests (versions, compacting one fragment, restoring the empty
#: version 1): with the data files gone they may still answer
READ_NO_ROWS = {"versions", "compact", "restore"}


def _commands(sections):
    return {
        "info": ["info"],
        "versions": ["versions"],
        "sql": ["sql", "SELECT count(*) AS n FROM spots"],
        "query": ["query", sections.heldout_tif, "--tissue", "breast", "--spots", sections.heldout_h5ad, "--k", "5"],
        "ingest": ["ingest", sections.other_h5ad, "--tissue", "breast", "--dataset", "other"],
        "compact": ["compact", "--keep-versions", "1"],
        "delete": ["delete", "--dataset", "train"],
        "index": ["index"],
        "restore": ["restore", "1"],  # last: with the manifests there it may succeed (version 1 is empty)
    }


@pytest.mark.parametrize("removed", ["_versions", "data"])
def test_every_command_on_a_store_with_files_gone_ends_in_one_line(store, sections, removed):
    """``store`` is this test's own copy of the session store: its spots table loses its manifests
    (``_versions``: no version can be opened) or its data files (``data``: versions open, rows do not)."""
    folder = store / "spots.lance" / removed
    gone = [p for p in folder.iterdir() if p.is_file()]
    assert gone, f"nothing to remove under {folder}"
    for path in gone:
        path.unlink()
    failed = []
    for name, args in _commands(sections).items():
        result = run(*args, "--db", store, ok=False)  # a traceback would escape here, failing the test
        if removed == "data" and name in READ_NO_ROWS and result.exit_code == 0:
            continue
        try:
            line = error_line(result)
        except AssertionError:
            failed.append(f"{name}: exit {result.exit_code}, output {result.output[-400:]!r}")
            continue
        reason = "was not found" if removed == "_versions" else "Not found"
        if reason not in line or "spots" not in line:
            failed.append(f"{name}: {line!r} does not say what is missing")
    assert not failed, "\n".join(failed)
