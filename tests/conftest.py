"""Shared test setup: eight fake CPU devices stand in for a TPU slice.

XLA reads the flag when jax initialises its backends, so it must be set before any test imports jax.
With libtpu installed (the `tpu` extra, for the ahead-of-time compile tests) jax would also try to
bring up a TPU backend and warn that there is none: the tests run on CPU, and compile for TPU only
through abstract topologies, which need no TPU backend.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
