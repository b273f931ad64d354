import sys

from adore_jax.cli import main

sys.exit(main())
