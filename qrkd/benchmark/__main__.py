"""`python -m qrkd.benchmark`: the same as `qrkd bench`."""

import sys

from .cli import main

sys.exit(main())
