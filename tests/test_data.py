"""Tests of kd_jax.data on small generated IDX files and CIFAR archives.

Example i of a generated split is an image filled with the value `first + i`
and labelled `LABEL_FN(i)`, so reading with preprocess='none' tells which
example each row is.
"""

import gzip
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from kd_jax import data
from kd_jax.data import builders

NUM_TRAIN, NUM_TEST = 60, 20
TRAIN_FIRST, TEST_FIRST = 0, 100  # Pixel value of example 0 of each split.


def label_fn(i):
  return (3 * i + 1) % 10


def write_idx(
  directory,
  prefix,
  n,
  first,
  *,
  gz=True,
  image_magic=2051,
  label_magic=2049,
  num_labels=None,
  rows=28,
):
  """Writes <prefix>-images-idx3-ubyte and <prefix>-labels-idx1-ubyte."""
  num_labels = n if num_labels is None else num_labels
  images = np.repeat((first + np.arange(n)).astype(np.uint8)[:, None, None], rows * 28).reshape(
    n, rows, 28
  )
  labels = label_fn(np.arange(num_labels)).astype(np.uint8)
  image_bytes = np.array([image_magic, n, rows, 28], ">u4").tobytes()
  label_bytes = np.array([label_magic, num_labels], ">u4").tobytes()
  opener, ext = (gzip.open, ".gz") if gz else (open, "")
  with opener(os.path.join(directory, f"{prefix}-images-idx3-ubyte{ext}"), "wb") as f:
    f.write(image_bytes + images.tobytes())
  with opener(os.path.join(directory, f"{prefix}-labels-idx1-ubyte{ext}"), "wb") as f:
    f.write(label_bytes + labels.tobytes())


def write_mnist_dir(directory, **train_kwargs):
  os.makedirs(directory, exist_ok=True)
  write_idx(directory, "train", NUM_TRAIN, TRAIN_FIRST, **train_kwargs)
  write_idx(directory, "t10k", NUM_TEST, TEST_FIRST, gz=False)  # Un-gzipped.
  return str(directory)


def config(name, data_dir, manual_dir="", preprocess="none", augment=False):
  cfg = data.default_data_config(name)
  cfg.data_dir, cfg.manual_dir = str(data_dir), str(manual_dir)
  cfg.preprocess, cfg.augment = preprocess, augment
  return cfg


def example_ids(images, first):
  """Recovers example indices from the (centre) pixel values of 'none' images."""
  h, w = images.shape[1:3]
  return np.rint(images[:, h // 2, w // 2, 0] * 255).astype(int) - first


def batches(ds):
  return list(data.as_numpy(ds))


@pytest.fixture(scope="module")
def mnist_cfg(tmp_path_factory):
  """A prepared generated 'mnist' (60 train, 20 test); preprocess='none'."""
  root = tmp_path_factory.mktemp("mnist")
  manual = write_mnist_dir(root / "manual")
  return config("mnist", root / "data", manual)


# ----------------------------------------------------------------------------
# Finding and preparing data
# ----------------------------------------------------------------------------


def test_default_data_config_fields():
  cfg = data.default_data_config()
  assert cfg.name == "fashion_mnist"
  assert cfg.data_dir == "~/tensorflow_datasets"
  assert not cfg.manual_dir
  assert cfg.preprocess in data.PREPROCESS_CHOICES
  assert cfg.augment is False


def test_idx_builder_prepares_exact_counts_labels_and_order(mnist_cfg):
  builder = data.get_builder("mnist", data_dir=mnist_cfg.data_dir, manual_dir=mnist_cfg.manual_dir)
  assert builder.name == "idx_mnist"
  assert builder.is_prepared()
  info = data.get_info(mnist_cfg)
  assert info == data.DatasetInfo(
    num_classes=10,
    image_shape=(28, 28, 1),
    num_train=NUM_TRAIN,
    num_test=NUM_TEST,
    class_names=tuple(str(i) for i in range(10)),
  )
  for split, n, first in (("train", NUM_TRAIN, TRAIN_FIRST), ("test", NUM_TEST, TEST_FIRST)):
    images, labels = data.load_arrays(mnist_cfg, split)
    assert images.shape == (n, 28, 28, 1) and images.dtype == np.float32
    assert labels.dtype == np.int32
    # Stored in file order, image i intact.
    np.testing.assert_array_equal(example_ids(images, first), np.arange(n))
    np.testing.assert_array_equal(labels, label_fn(np.arange(n)))
    assert images.min() == images.max(axis=(1, 2, 3)).min()  # Uniform images.


def test_prepared_dataset_is_reused_without_manual_dir(mnist_cfg):
  data.get_builder("mnist", data_dir=mnist_cfg.data_dir, manual_dir=mnist_cfg.manual_dir)
  builder = data.get_builder("mnist", data_dir=mnist_cfg.data_dir, manual_dir=None)
  assert builder.name == "idx_mnist"


def test_mnist_and_fashion_mnist_do_not_collide(tmp_path):
  write_mnist_dir(tmp_path / "digits")
  write_mnist_dir(tmp_path / "fashion")
  mnist = data.get_builder("mnist", data_dir=tmp_path / "data", manual_dir=tmp_path / "digits")
  fashion = data.get_builder(
    "fashion_mnist", data_dir=tmp_path / "data", manual_dir=tmp_path / "fashion"
  )
  assert (mnist.name, fashion.name) == ("idx_mnist", "idx_fashion_mnist")
  assert mnist.data_dir != fashion.data_dir
  assert fashion.info.features["label"].names[0] == "T-shirt/top"


def test_unknown_dataset_name_lists_choices(tmp_path):
  with pytest.raises(ValueError, match="cifar10.*mnist.*fashion_mnist"):
    data.get_builder("imagenet", data_dir=tmp_path, manual_dir=None)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(image_magic=2049), r"train-images-idx3-ubyte\.gz: bad magic number 2049"),
    (dict(label_magic=2051), r"train-labels-idx1-ubyte\.gz: bad magic number 2051"),
    (
      dict(num_labels=NUM_TRAIN - 1),
      r"has 60 images but .*train-labels-idx1-ubyte\.gz has 59 labels",
    ),
    (dict(rows=27), r"images are 27x28, expected 28x28"),
  ],
)
def test_idx_format_errors_name_file_and_problem(tmp_path, kwargs, message):
  manual = write_mnist_dir(tmp_path / "manual", **kwargs)
  with pytest.raises(ValueError, match=message):
    data.get_builder("mnist", data_dir=tmp_path / "data", manual_dir=manual)
  # Nothing half-written that could later pass for a prepared dataset.
  assert not builders.IdxMnist(data_dir=str(tmp_path / "data")).is_prepared()
  assert not list((tmp_path / "data").glob("idx_mnist/*incomplete*"))


def test_idx_truncated_and_missing_files(tmp_path):
  manual = tmp_path / "manual"
  write_mnist_dir(manual)
  path = manual / "t10k-images-idx3-ubyte"
  path.write_bytes(path.read_bytes()[:-5])
  with pytest.raises(
    ValueError, match=r"t10k-images-idx3-ubyte: header says 20 images .*truncated"
  ):
    data.get_builder("mnist", data_dir=tmp_path / "data", manual_dir=manual)
  path.unlink()
  with pytest.raises(
    ValueError,
    match=r"missing file: neither "
    r"t10k-images-idx3-ubyte\.gz nor t10k-images-idx3-ubyte",
  ):
    data.get_builder("mnist", data_dir=tmp_path / "data", manual_dir=manual)
  # Fixing the files afterwards works: no stale state was left behind.
  write_mnist_dir(manual)
  builder = data.get_builder("mnist", data_dir=tmp_path / "data", manual_dir=manual)
  assert builder.info.splits["test"].num_examples == NUM_TEST


@pytest.fixture
def no_download(monkeypatch):
  """Makes every TFDS download fail at once, as offline but without waiting."""

  def fail(self, *args, **kwargs):
    raise ConnectionError(f"no network for {self.name}")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
@pytest.mark.parametrize("manual", ["empty", None])
def test_no_data_anywhere_raises_data_not_found(tmp_path, monkeypatch, name, manual):
  """A manual_dir without the files fails at once; only without one does TFDS download."""
  attempts = []

  def fail(self, *args, **kwargs):
    attempts.append(self.name)
    raise ConnectionError(f"no network for {self.name}")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)
  if manual:
    (tmp_path / manual).mkdir()
  with pytest.raises(data.DataNotFoundError) as e:
    data.get_builder(name, data_dir=tmp_path / "data", manual_dir=manual and tmp_path / manual)
  message = str(e.value)
  assert message.startswith(f"no {name} data: put ")
  assert "--config.data.manual_dir" in message
  assert "--config.data.data_dir" in message
  if manual:
    assert attempts == []
    assert "which has none of them" in message
    assert "Nothing was downloaded: --config.data.manual_dir is set" in message
  else:
    assert attempts == [name]
    assert "(now: unset)" in message
    assert "Downloading it with TFDS failed: ConnectionError" in message
  expected_file = "cifar-10-python.tar.gz" if name == "cifar10" else "train-images-idx3-ubyte.gz"
  assert expected_file in message
  assert isinstance(e.value, ValueError)


def test_tfds_archive_in_manual_dir_goes_to_tfds(tmp_path, no_download):
  """cifar-10-binary.tar.gz (TFDS's own file) in manual_dir: TFDS's builder reads it."""
  (tmp_path / "manual").mkdir()
  (tmp_path / "manual" / "cifar-10-binary.tar.gz").write_bytes(b"")
  with pytest.raises(
    data.DataNotFoundError, match="Preparing it with TFDS failed: ConnectionError"
  ):
    data.get_builder("cifar10", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual")


def test_download_false_fails_at_once_and_says_why(tmp_path):
  with pytest.raises(data.DataNotFoundError, match=r"which does not exist.*Nothing was downloaded"):
    data.get_builder(
      "fashion_mnist", data_dir=tmp_path / "data", manual_dir=tmp_path / "nowhere", download=False
    )
  cfg = config("mnist", tmp_path / "data")
  cfg.download = False
  with pytest.raises(data.DataNotFoundError, match=r"manual_dir \(now: unset\)"):
    data.get_info(cfg)


# ----------------------------------------------------------------------------
# CIFAR-10 python archive
# ----------------------------------------------------------------------------

CIFAR_ROWS = 4  # Rows per batch in the tiny archive (the real one: 10000).


def cifar_batch(batch_index, rows=CIFAR_ROWS, row_bytes=3072):
  ids = batch_index * rows + np.arange(rows)
  # Planar rows: R plane = id, G plane = 100 + id, B plane = 200 + id; pixel
  # (0, 1) of the R plane is 50 to check the HWC transpose.
  planes = np.stack([ids, 100 + ids, 200 + ids], 1).astype(np.uint8)
  rows_data = np.repeat(planes, 1024, axis=1)
  rows_data[:, 1] = 50
  return {
    b"data": rows_data[:, :row_bytes],
    b"labels": [int(label_fn(i)) for i in ids],
    b"batch_label": b"test",
    b"filenames": [b"x.png"] * rows,
  }


def write_cifar_archive(path, *, row_bytes=3072, skip=()):
  names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
  members = {n: cifar_batch(i, row_bytes=row_bytes) for i, n in enumerate(names)}
  members["batches.meta"] = {b"label_names": [n.encode() for n in builders.CIFAR10_CLASS_NAMES]}
  with tarfile.open(path, "w:gz") as tar:
    for name, obj in members.items():
      if name in skip:
        continue
      payload = pickle.dumps(obj, protocol=2)
      info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))


def test_cifar10_python_archive_loads(tmp_path):
  (tmp_path / "manual").mkdir()
  write_cifar_archive(tmp_path / "manual" / "cifar-10-python.tar.gz")
  cfg = config("cifar10", tmp_path / "data", tmp_path / "manual")
  info = data.get_info(cfg)
  assert info.num_train == 5 * CIFAR_ROWS and info.num_test == CIFAR_ROWS
  assert info.image_shape == (32, 32, 3)
  assert info.class_names == builders.CIFAR10_CLASS_NAMES
  images, labels = data.load_arrays(cfg, "train")
  ids = np.arange(5 * CIFAR_ROWS)
  np.testing.assert_array_equal(labels, label_fn(ids))
  pixels = np.rint(images * 255).astype(int)
  np.testing.assert_array_equal(pixels[:, 5, 5], np.stack([ids, 100 + ids, 200 + ids], 1))
  np.testing.assert_array_equal(pixels[:, 0, 1, 0], 50)  # Row-major planes.
  test_images, _ = data.load_arrays(cfg, "test")
  np.testing.assert_array_equal(
    np.rint(test_images[:, 5, 5, 0] * 255), 5 * CIFAR_ROWS + np.arange(CIFAR_ROWS)
  )


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(row_bytes=3000), r"data_batch_1: rows have 3000 bytes, expected 3072"),
    (dict(skip=("data_batch_3",)), r"missing data_batch_3"),
  ],
)
def test_cifar10_format_errors(tmp_path, kwargs, message):
  (tmp_path / "manual").mkdir()
  write_cifar_archive(tmp_path / "manual" / "cifar-10-python.tar.gz", **kwargs)
  with pytest.raises(ValueError, match=message):
    data.get_builder("cifar10", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual")


def test_cifar10_pickle_may_not_name_arbitrary_code(tmp_path):
  from kd_jax.data import formats

  class Evil:
    def __reduce__(self):
      return (os.system, ("true",))

  with pytest.raises(ValueError, match="not allowed"):
    formats._unpickle(pickle.dumps(Evil()), "evil")  # pylint: disable=protected-access


# ----------------------------------------------------------------------------
# Class subsets
# ----------------------------------------------------------------------------


def test_class_subset_keeps_and_remaps(mnist_cfg):
  classes = [4, 1]
  images, labels = data.load_arrays(mnist_cfg, "train", classes=classes)
  ids = example_ids(images, TRAIN_FIRST)
  expected_ids = [i for i in range(NUM_TRAIN) if label_fn(i) in classes]
  np.testing.assert_array_equal(ids, expected_ids)
  np.testing.assert_array_equal(labels, [classes.index(label_fn(i)) for i in ids])
  info = data.get_info(mnist_cfg, classes=classes)
  assert (info.num_classes, info.class_names) == (2, ("4", "1"))
  assert info.num_train == len(expected_ids)
  # The training pipeline sees the same subset.
  ds = data.make_dataset(mnist_cfg, "train", batch_size=4, train=True, seed=0, classes=classes)
  seen = np.concatenate([b["label"] for b in batches(ds)])
  assert set(seen) == {0, 1} and len(seen) == len(expected_ids) // 4 * 4


def test_class_subset_counts_are_read_once_per_dataset(mnist_cfg, monkeypatch):
  from kd_jax.data import sources  # pylint: disable=g-import-not-at-top

  reads = []
  read = sources.read_split
  monkeypatch.setattr(
    sources, "read_split", lambda *args, **kwargs: reads.append(args[1:3]) or read(*args, **kwargs)
  )
  monkeypatch.setattr(sources, "_COUNTS", sources.ExampleCounts())
  counts = [
    data.get_info(mnist_cfg, classes=[3, 5]).num_train,
    data.num_batches(mnist_cfg, "train", batch_size=1, train=True, classes=[3, 5]),
    data.get_info(mnist_cfg, classes=[3, 5]).num_train,
  ]
  assert counts == [sum(label_fn(i) in (3, 5) for i in range(NUM_TRAIN))] * 3
  assert sorted(reads) == [("test", (3, 5)), ("train", (3, 5))]  # one pass each, not one per call


@pytest.mark.parametrize(
  "classes, message",
  [([], "empty"), ([0, 10], "out of range"), ([2, 2], "duplicates"), ([-1], "out of range")],
)
def test_class_subset_validation(mnist_cfg, classes, message):
  with pytest.raises(ValueError, match=message):
    data.make_dataset(mnist_cfg, "train", batch_size=4, train=True, classes=classes)


# ----------------------------------------------------------------------------
# Shuffling, batching, evaluation
# ----------------------------------------------------------------------------


def epoch_order(cfg, *, seed, epoch, batch_size=20, **kwargs):
  ds = data.make_dataset(
    cfg, "train", batch_size=batch_size, train=True, seed=seed, epoch=epoch, **kwargs
  )
  return np.concatenate([example_ids(b["image"], TRAIN_FIRST) for b in batches(ds)])


def test_shuffle_is_a_seeded_permutation_per_epoch(mnist_cfg):
  order = epoch_order(mnist_cfg, seed=0, epoch=0)
  np.testing.assert_array_equal(np.sort(order), np.arange(NUM_TRAIN))  # Once each.
  assert not np.array_equal(order, np.arange(NUM_TRAIN))
  np.testing.assert_array_equal(order, epoch_order(mnist_cfg, seed=0, epoch=0))
  assert not np.array_equal(order, epoch_order(mnist_cfg, seed=0, epoch=1))
  assert not np.array_equal(order, epoch_order(mnist_cfg, seed=1, epoch=0))
  # TF's global seed plays no part.
  tf.random.set_seed(1234)
  try:
    np.testing.assert_array_equal(order, epoch_order(mnist_cfg, seed=0, epoch=0))
  finally:
    tf.random.set_seed(None)


def test_resuming_at_epoch_replays_the_same_batches(mnist_cfg):
  two = epoch_order(mnist_cfg, seed=3, epoch=0, num_epochs=2)
  np.testing.assert_array_equal(two[:NUM_TRAIN], epoch_order(mnist_cfg, seed=3, epoch=0))
  np.testing.assert_array_equal(two[NUM_TRAIN:], epoch_order(mnist_cfg, seed=3, epoch=1))
  endless = data.make_dataset(
    mnist_cfg, "train", batch_size=20, train=True, seed=3, epoch=0, num_epochs=None
  )
  first_six = [example_ids(b["image"], TRAIN_FIRST) for b in endless.take(6).as_numpy_iterator()]
  np.testing.assert_array_equal(np.concatenate(first_six[3:]), two[NUM_TRAIN:])


def test_index_is_the_stored_position_in_every_epoch(mnist_cfg):
  """'index' keys per-example data computed once in stored order (cached teacher logits)."""
  ds = data.make_dataset(
    mnist_cfg,
    "train",
    batch_size=20,
    train=True,
    seed=5,
    num_epochs=2,
    classes=(1, 4, 7),
    with_index=True,
  )
  stored = np.concatenate(
    [
      b["image"][b["mask"]]
      for b in batches(
        data.make_dataset(mnist_cfg, "train", batch_size=20, train=False, classes=(1, 4, 7))
      )
    ]
  )
  seen = 0
  for b in batches(ds):
    np.testing.assert_array_equal(b["image"], stored[b["index"]])
    seen += len(b["index"])
  assert seen == 2 * (len(stored) // 20) * 20
  plain = next(iter(batches(data.make_dataset(mnist_cfg, "train", batch_size=20, train=True))))
  assert "index" not in plain


def test_train_drops_remainder(mnist_cfg):
  ds = data.make_dataset(mnist_cfg, "train", batch_size=16, train=True, seed=0, num_epochs=2)
  out = batches(ds)
  assert len(out) == 2 * (NUM_TRAIN // 16)
  assert data.num_batches(mnist_cfg, "train", batch_size=16, train=True) == NUM_TRAIN // 16
  for b in out:
    assert set(b) == {"image", "label"}
    assert b["image"].shape == (16, 28, 28, 1) and b["image"].dtype == np.float32
    assert b["label"].shape == (16,) and b["label"].dtype == np.int32
  # Batches do not straddle epochs: each epoch holds distinct examples.
  first = np.concatenate([example_ids(b["image"], TRAIN_FIRST) for b in out[:3]])
  assert len(set(first)) == len(first)


def test_eval_covers_every_example_once_with_mask(mnist_cfg):
  ds = data.make_dataset(mnist_cfg, "test", batch_size=16, train=False)
  out = batches(ds)
  assert len(out) == 2 == data.num_batches(mnist_cfg, "test", batch_size=16, train=False)
  for b in out:
    assert b["image"].shape == (16, 28, 28, 1) and b["mask"].dtype == bool
  mask = np.concatenate([b["mask"] for b in out])
  ids = np.concatenate([example_ids(b["image"], TEST_FIRST) for b in out])
  labels = np.concatenate([b["label"] for b in out])
  np.testing.assert_array_equal(ids[mask], np.arange(NUM_TEST))  # Stored order.
  np.testing.assert_array_equal(labels[mask], label_fn(np.arange(NUM_TEST)))
  assert mask.sum() == NUM_TEST and not mask[NUM_TEST:].any()
  assert not np.concatenate([b["image"] for b in out])[~mask].any()


def test_processes_take_their_rows_of_the_one_process_batches(mnist_cfg):
  """P processes' batches, side by side, are exactly one process's: the same global
  order (shuffle, augmentation, padding), each process its contiguous rows."""

  def run(split, train, process_index, process_count, **kwargs):
    ds = data.make_dataset(
      mnist_cfg,
      split,
      batch_size=12,
      train=train,
      seed=3,
      num_epochs=2,
      process_index=process_index,
      process_count=process_count,
      with_index=True,
      **kwargs,
    )
    return batches(ds)

  augmented = config("mnist", mnist_cfg.data_dir, augment=True)
  for cfg, split, train in (
    (mnist_cfg, "test", False),
    (augmented, "train[:27]", True),
    (mnist_cfg, "train", True),
  ):
    whole = batches(
      data.make_dataset(
        cfg,
        split,
        batch_size=12,
        train=train,
        seed=3,
        num_epochs=2,
        process_index=0,
        process_count=1,
        with_index=True,
      )
    )
    for count in (2, 3):
      parts = [
        batches(
          data.make_dataset(
            cfg,
            split,
            batch_size=12,
            train=train,
            seed=3,
            num_epochs=2,
            process_index=p,
            process_count=count,
            with_index=True,
          )
        )
        for p in range(count)
      ]
      assert all(len(part) == len(whole) for part in parts), (split, count)
      for b, one in enumerate(whole):
        for key, value in one.items():
          stacked = np.concatenate([part[b][key] for part in parts])
          np.testing.assert_array_equal(stacked, value, err_msg=f"{split} {count} {b} {key}")
  # 27 examples, batch 12: 2 full training batches per epoch; 20 test examples: 2 batches.
  assert len(run("train[:27]", True, 1, 2)) == 2 * 2
  assert len(run("test", False, 1, 2)) == 2 * 2
  with pytest.raises(ValueError, match="divisible"):
    run("test", False, 0, 5)


# ----------------------------------------------------------------------------
# Preprocessing and augmentation
# ----------------------------------------------------------------------------


def test_mean_image_preprocessing_centres_the_train_split(mnist_cfg):
  cfg = config("mnist", mnist_cfg.data_dir, preprocess="mean_image")
  images, _ = data.load_arrays(cfg, "train")
  np.testing.assert_allclose(images.mean(axis=0), 0.0, atol=1e-5)
  raw, _ = data.load_arrays(mnist_cfg, "train")
  assert abs(raw.max() - raw.min() - (images.max() - images.min())) < 1e-5  # /255 scale.
  builder = data.get_builder("mnist", data_dir=cfg.data_dir, manual_dir=None)
  assert os.path.isfile(os.path.join(builder.data_dir, "kd_jax_train_stats.npz"))
  # Test images get the TRAIN mean, whatever split or classes are read.
  test_images, _ = data.load_arrays(cfg, "test", classes=[1])
  raw_test, _ = data.load_arrays(mnist_cfg, "test", classes=[1])
  np.testing.assert_allclose(test_images, raw_test - raw.mean(0), atol=1e-5)

  cfg.preprocess = "mean_image_255"
  images_255, _ = data.load_arrays(cfg, "train")
  np.testing.assert_allclose(images_255, 255 * images, atol=1e-3)


def test_standardize_and_unknown_preprocess(mnist_cfg):
  cfg = config("mnist", mnist_cfg.data_dir, preprocess="standardize")
  images, _ = data.load_arrays(cfg, "train")
  np.testing.assert_allclose(images.mean(), 0.0, atol=1e-4)
  np.testing.assert_allclose(images.std(), 1.0, atol=1e-3)
  cfg.preprocess = "whiten"
  with pytest.raises(ValueError, match="mean_image"):
    data.load_arrays(cfg, "train")


def test_augmentation_is_seeded_and_keeps_shapes(mnist_cfg):
  cfg = config("mnist", mnist_cfg.data_dir, augment=True)

  def images(seed, epoch):
    ds = data.make_dataset(cfg, "train", batch_size=20, train=True, seed=seed, epoch=epoch)
    return np.concatenate([b["image"] for b in batches(ds)])

  a = images(0, 0)
  assert a.shape == (NUM_TRAIN, 28, 28, 1)
  np.testing.assert_array_equal(a, images(0, 0))
  # Same order as without augmentation; centre pixels survive a 4-pixel shift.
  np.testing.assert_array_equal(
    example_ids(a, TRAIN_FIRST), epoch_order(mnist_cfg, seed=0, epoch=0)
  )
  # Pad-and-crop blacked out some borders (the generated images are uniform).
  assert (a == 0).any(axis=(1, 2, 3)).sum() > NUM_TRAIN // 2
  # Another epoch crops the same examples differently.
  b = images(0, 1)
  by_id = lambda x: x[np.argsort(example_ids(x, TRAIN_FIRST))]
  assert not np.array_equal(by_id(a), by_id(b))
  # Evaluation is never augmented.
  ds = data.make_dataset(cfg, "test", batch_size=20, train=False)
  assert (batches(ds)[0]["image"] > 0).all()


# ----------------------------------------------------------------------------
# tfds.testing.mock_data with the standard names
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_pipeline_works_with_tfds_mock_data(tmp_path, name, shape):
  cfg = config(name, tmp_path / "data", preprocess="mean_image")
  with tfds.testing.mock_data(num_examples=10):
    info = data.get_info(cfg)
    assert info.image_shape == shape and info.num_classes == 10
    train = batches(data.make_dataset(cfg, "train", batch_size=4, train=True, seed=0))
    assert len(train) == 2 and train[0]["image"].shape == (4,) + shape
    test = batches(data.make_dataset(cfg, "test", batch_size=4, train=False))
    assert sum(int(b["mask"].sum()) for b in test) == 10
  # Statistics of mock data must not be cached anywhere.
  assert not list(tmp_path.rglob("kd_jax_train_stats.npz"))
