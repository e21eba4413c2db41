"""Input pipeline: CIFAR-10, MNIST and Fashion-MNIST as tf.data batches for JAX."""

from kd_jax.data.pipeline import DATASET_NAMES
from kd_jax.data.pipeline import DataNotFoundError
from kd_jax.data.pipeline import DatasetInfo
from kd_jax.data.pipeline import PREPROCESS_CHOICES
from kd_jax.data.pipeline import as_numpy
from kd_jax.data.pipeline import default_data_config
from kd_jax.data.pipeline import get_builder
from kd_jax.data.pipeline import get_info
from kd_jax.data.pipeline import load_arrays
from kd_jax.data.pipeline import make_dataset
from kd_jax.data.pipeline import num_batches
from kd_jax.data.pipeline import train_stats

__all__ = [
    "DATASET_NAMES",
    "DataNotFoundError",
    "DatasetInfo",
    "PREPROCESS_CHOICES",
    "as_numpy",
    "default_data_config",
    "get_builder",
    "get_info",
    "load_arrays",
    "make_dataset",
    "num_batches",
    "train_stats",
]
