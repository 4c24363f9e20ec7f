"""`python -m alpacare_jax.eval.human {create,serve,results}`."""

import sys

from .cli import main

sys.exit(main())
