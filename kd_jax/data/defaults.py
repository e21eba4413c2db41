"""The data config's fields and their defaults (see `kd_jax.data` for what each means).

Apart from the pipeline so that building and validating a config needs no TensorFlow.
"""

from collections.abc import Mapping
from typing import Any


def default_data_config(name: str = "fashion_mnist") -> Any:
  """Returns a ConfigDict with every data field and its default."""
  import ml_collections  # pylint: disable=g-import-not-at-top  (only here; callers may use any object)

  return ml_collections.ConfigDict(
    {
      "name": name,
      "data_dir": "~/tensorflow_datasets",
      "manual_dir": "",
      "preprocess": "mean_image",
      "augment": False,
      "download": True,
      "shuffle_buffer": 0,
    }
  )


def as_data_config(config) -> Any:
  """A data config from `config`: a plain mapping (e.g. a results.json's `config['data']`)
  becomes a ConfigDict of the defaults updated by it; anything else is returned as it is."""
  if not isinstance(config, Mapping):
    return config
  if not config.get("name"):
    raise ValueError("a data config needs a 'name' (cifar10, mnist or fashion_mnist)")
  merged = default_data_config(config["name"])
  merged.update(dict(config))
  return merged
