"""Thin entry point: `python run.py ARGS` is `slt ARGS`."""

import sys

from slt.cli import main

if __name__ == "__main__":
    sys.exit(main())
