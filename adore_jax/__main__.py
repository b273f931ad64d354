"""`python -m adore_jax`: the `adore` command line (adore_jax.cli)."""

import sys

from adore_jax.cli import main

sys.exit(main())
