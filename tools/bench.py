#!/usr/bin/env python
"""Thin wrapper: ``python tools/bench.py [OPTIONS]`` = ``ufad bench [OPTIONS]``.

The lead's reference run (quiet machine, numbers for BENCHMARKS.md):

    python tools/bench.py --json bench.json --markdown bench.md
"""

import sys

from ufad.runtime.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]], prog_name="ufad"))
