"""``python -m histoindex.cli ...``: the command line as a module (torchrun launches it this way)."""

from histoindex.cli import main

if __name__ == "__main__":
    main()
