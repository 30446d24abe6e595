"""No import cycle anywhere in the package, package ``__init__`` modules included (import-linter's
``acyclic_siblings`` contract checks siblings only: a module importing its own package's
``__init__``, which re-exports it, would slip past it)."""

from __future__ import annotations

import pytest

grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter (the dev extra)")


def test_no_module_imports_itself_back():
    graph = grimp.build_graph("histoindex")
    cycles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back:
                cycles.append(" -> ".join((importer, *back)))
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
