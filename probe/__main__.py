"""`python -m probe` is the same as the `probe` console script."""

import sys

from probe.cli import main

sys.exit(main())
