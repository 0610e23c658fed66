"""``python -m ufad.runtime.cli`` = ``ufad``."""

import sys

from . import main

sys.exit(main())
