"""Training data: tfds builders for local folders (`builders`), per-task token streams
(`transforms`), packing (`packing`) and the mixed, sharded, checkpointable pipeline (`pipeline`)."""

from janus_jax.data.pipeline import (DatasetError, default_config, make_dataset, make_pipeline,
                                     source_config)

__all__ = ["DatasetError", "default_config", "make_dataset", "make_pipeline", "source_config"]
