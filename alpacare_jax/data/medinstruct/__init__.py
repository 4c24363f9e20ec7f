"""TFDS builder for the AlpaCare data: `medinstruct/medinstruct_52k`, `medinstruct/medinstruct_test`,
`medinstruct/icliniq`.

Importing this package only registers the builder with TFDS (so `tfds.data_source("medinstruct/...")`
finds it); it reads and writes nothing. Build with `python -m alpacare_jax.data.build`.
"""

from alpacare_jax.data.medinstruct.medinstruct_dataset_builder import Builder

__all__ = ["Builder"]
