"""`python -m vqlib`: the command line of `vqlib.cli` (`python -m vqlib --help`)."""

from vqlib.cli import main

if __name__ == "__main__":
    main()
