"""The project's own TFDS builders, for data files users put in a `manual_dir`.

TFDS's `mnist`, `fashion_mnist` and `cifar10` builders only accept files that
match their registered checksums (and `cifar10` wants the binary archive), so
recompressed copies, such as Debian's `dataset-fashion-mnist` package, are
rejected. These builders read the files by format instead and check that
format (see `formats.py`):

  idx_mnist          MNIST IDX files (`train-images-idx3-ubyte[.gz]`, ...).
  idx_fashion_mnist  Fashion-MNIST IDX files (same file names).
  cifar10_python     `cifar-10-python.tar.gz` (or its extracted folder).

Each has its own name, so MNIST and Fashion-MNIST prepared from two manual
dirs land in different folders of one `data_dir`. Features match the standard
TFDS datasets ('image' uint8 HWC, 'label' ClassLabel), so the input pipeline
reads both kinds the same way. Shuffling is disabled: examples are stored in
file order, so example i of a split is example i of the source files.

Preparing is atomic: TFDS writes into `<data_dir>/<name>/incomplete.XXXXXX_<v>/`
and renames it to `<data_dir>/<name>/<v>/` only on success (and deletes it on
failure), so a failed or interrupted run never leaves a dataset that looks
prepared.
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from kd_jax.data import formats

_IDX_INSTRUCTIONS = """\
Put the four IDX files, gzipped or not, in `manual_dir`:
  train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz
  t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz
"""

MNIST_CLASS_NAMES = tuple(str(i) for i in range(10))
FASHION_MNIST_CLASS_NAMES = (
  "T-shirt/top",
  "Trouser",
  "Pullover",
  "Dress",
  "Coat",
  "Sandal",
  "Shirt",
  "Sneaker",
  "Bag",
  "Ankle boot",
)  # pyformat: disable
CIFAR10_CLASS_NAMES = (
  "airplane",
  "automobile",
  "bird",
  "cat",
  "deer",
  "dog",
  "frog",
  "horse",
  "ship",
  "truck",
)  # pyformat: disable


class IdxMnist(tfds.core.GeneratorBasedBuilder):
  """MNIST read from IDX files in `manual_dir`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _IDX_INSTRUCTIONS
  CLASS_NAMES = MNIST_CLASS_NAMES
  DESCRIPTION = "MNIST handwritten digits, from IDX files."

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      description=self.DESCRIPTION,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=formats.MNIST_SHAPE + (1,)),
          "label": tfds.features.ClassLabel(names=list(self.CLASS_NAMES)),
        }
      ),
      supervised_keys=("image", "label"),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    # Read and check every file before TFDS writes anything: a bad test file
    # should not cost the time of writing the training split first.
    data = {
      split: formats.read_idx_split(dl_manager.manual_dir, split) for split in formats.IDX_FILES
    }
    return {split: self._generate_examples(*arrays) for split, arrays in data.items()}

  def _generate_examples(self, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image, "label": int(label)}


class IdxFashionMnist(IdxMnist):
  """Fashion-MNIST read from IDX files in `manual_dir`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  CLASS_NAMES = FASHION_MNIST_CLASS_NAMES
  DESCRIPTION = "Fashion-MNIST (Zalando article images), from IDX files."


class Cifar10Python(tfds.core.GeneratorBasedBuilder):
  """CIFAR-10 read from `cifar-10-python.tar.gz` in `manual_dir`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    f"Put {formats.CIFAR10_ARCHIVE} (the CIFAR-10 python version), or the "
    f"{formats.CIFAR10_DIR}/ folder it holds, in `manual_dir`.\n"
  )

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      description="CIFAR-10 tiny images, from the python-pickle archive.",
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(32, 32, 3)),
          "label": tfds.features.ClassLabel(names=list(CIFAR10_CLASS_NAMES)),
        }
      ),
      supervised_keys=("image", "label"),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    source = formats.cifar10_source(dl_manager.manual_dir)
    if source is None:
      raise ValueError(
        f"missing file: neither {formats.CIFAR10_ARCHIVE} nor "
        f"{formats.CIFAR10_DIR}/ is in {dl_manager.manual_dir}."
      )
    splits, _ = formats.read_cifar10(source)
    return {split: self._generate_examples(*arrays) for split, arrays in splits.items()}

  def _generate_examples(self, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image, "label": int(label)}
