"""Write docs/CLI.md, the command reference, from the click definitions themselves.

    python docs/cli_reference.py           # (re)write docs/CLI.md
    python docs/cli_reference.py --check   # exit 1 when docs/CLI.md is not what this would write

Every command's ``--help``, in the order ``histoindex --help`` lists them, at a fixed width, so the
file is the same on every machine; tests/test_docs.py runs the check, so an option changed without
regenerating fails CI.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from histoindex.cli import cli

#: the help's line width: fixed, never the terminal's
WIDTH = 100
TARGET = Path(__file__).resolve().parent / "CLI.md"
REGENERATE = "python docs/cli_reference.py"


def reference() -> str:
    """The Markdown text of docs/CLI.md."""
    root = click.Context(cli, info_name="histoindex", terminal_width=WIDTH, max_content_width=WIDTH)
    names = [name for name in cli.list_commands(root) if not cli.get_command(root, name).hidden]
    parts = [
        "# Command reference\n",
        f"Generated from the click definitions by `{REGENERATE}`; do not edit by hand (CI checks it is current).",
        "Each section is the command's `--help`. The README has a tour of the everyday commands.\n",
        "## histoindex\n",
        _fenced(cli.get_help(root)),
        "Commands: " + ", ".join(f"[`{name}`](#histoindex-{name})" for name in names) + "\n",
    ]
    for name in names:
        command = cli.get_command(root, name)
        context = click.Context(command, info_name=name, parent=root, terminal_width=WIDTH, max_content_width=WIDTH)
        parts += [f"## histoindex {name}\n", _fenced(command.get_help(context))]
    return "\n".join(parts)


def _fenced(text: str) -> str:
    return "```text\n" + "\n".join(line.rstrip() for line in text.splitlines()) + "\n```\n"


def main(argv: list[str]) -> int:
    if argv not in ([], ["--check"]):
        print(f"usage: {REGENERATE} [--check]", file=sys.stderr)
        return 2
    text = reference()
    if argv == ["--check"]:
        if not TARGET.is_file() or TARGET.read_text(encoding="utf-8") != text:
            print(f"docs/{TARGET.name} is not current with the click definitions: run {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text, encoding="utf-8")
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
