"""``python -m jacgrad.bench ARGS`` — the same as ``jacgrad bench ARGS``."""

import sys

from . import main

sys.exit(main())
