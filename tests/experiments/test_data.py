"""Tests of experiments/data.py: offline Fashion-MNIST, fallback, TFDS path, batching."""

import collections
import os
import sys
import time

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

tfds = pytest.importorskip("tensorflow_datasets")
import PIL.Image as PIL_Image  # noqa: E402

from experiments import data  # noqa: E402
from experiments.datasets import augment, digits, fashion_mnist_local  # noqa: E402

# ------------------------------------------------------------ tiny local datasets


class JaxpruneTinyCifar(tfds.core.GeneratorBasedBuilder):
  """CIFAR-10-like: PNG-encoded 32x32x3 images and a 10-class label."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(32, 32, 3)),
          "label": tfds.features.ClassLabel(num_classes=10),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(40, 0), "test": self._generate_examples(20, 1)}

  def _generate_examples(self, n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
      image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
      yield i, {"image": PIL_Image.fromarray(image), "label": i % 10}


class JaxpruneTinyImagenet(tfds.core.GeneratorBasedBuilder):
  """ImageNet-like: JPEG images of varying sizes and a 1000-class label."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(num_classes=1000),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(12, 0), "validation": self._generate_examples(5, 1)}

  def _generate_examples(self, n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
      h, w = 40 + 7 * i, 64 - 3 * i
      image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      yield i, {"image": PIL_Image.fromarray(image), "label": 100 * (i % 10)}


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tiny_tfds"))
  for builder in (JaxpruneTinyCifar, JaxpruneTinyImagenet):
    builder(data_dir=d, file_format="array_record").download_and_prepare()
  return d


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory):
  """Fashion-MNIST converted once per session from the Debian files."""
  if not fashion_mnist_local.source_files_present(data.FASHION_MNIST_DIR):
    pytest.skip("Debian package dataset-fashion-mnist is not installed")
  d = str(tmp_path_factory.mktemp("fmnist"))
  data.load("fashion_mnist", "train", d)
  return d


def tiny_cifar_config(tiny_dir):
  return {
    "dataset": "cifar10",
    "tfds_name": "jaxprune_tiny_cifar",
    "data_dir": tiny_dir,
    "batch_size": 8,
    "seed": 5,
  }


def digits_source(split="train"):
  return data.load("digits", split)


# ------------------------------------------------------------ Fashion-MNIST (real)


def test_fashion_mnist_local_has_the_real_data(fmnist_dir):
  train = data.load("fashion_mnist", "train", fmnist_dir)
  test = data.load("fashion_mnist", "test", fmnist_dir)
  assert (len(train), len(test)) == (60_000, 10_000)
  assert "tfds fashion_mnist_local" in train.origin
  assert train.num_classes == 10 and train.input_shape == (28, 28, 1)

  record = train[123]
  assert record["image"].shape == (28, 28, 1) and record["image"].dtype == np.uint8
  assert 0 <= int(record["label"]) < 10

  # Every (image, label) pair of the test split is exactly one from the idx files.
  src = data.FASHION_MNIST_DIR
  images = fashion_mnist_local.read_idx(os.path.join(src, "t10k-images-idx3-ubyte.gz"))
  labels = fashion_mnist_local.read_idx(os.path.join(src, "t10k-labels-idx1-ubyte.gz"))
  expected = collections.Counter((im.tobytes(), int(y)) for im, y in zip(images, labels))
  got = collections.Counter(
    (r["image"][..., 0].tobytes(), int(r["label"]))
    for r in test.__getitems__(list(range(len(test))))
  )
  assert got == expected
  assert sorted(collections.Counter(int(y) for _, y in got).values()) == [1000] * 10
  # Built and read without TensorFlow.
  assert "tensorflow" not in sys.modules


def test_fashion_mnist_batches(fmnist_dir):
  train = data.load({"dataset": "fashion_mnist", "data_dir": fmnist_dir}, "train")
  batch = data.Batches(train, 256, seed=0).batch_at(3)
  assert batch["image"].shape == (256, 28, 28, 1)
  assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
  assert batch["image"].min() >= 0.0 and batch["image"].max() <= 1.0
  assert batch["image"].max() == 1.0  # Scaled from 0..255.
  assert set(np.unique(batch["label"])) <= set(range(10))
  assert len(np.unique(batch["label"])) == 10


def test_prepared_fashion_mnist_is_reused(fmnist_dir, capsys):
  start = time.perf_counter()
  data.load("fashion_mnist", "test", fmnist_dir)
  assert time.perf_counter() - start < 5.0
  assert "Converting" not in capsys.readouterr().out


def test_read_idx_rejects_other_files(tmp_path):
  bad = tmp_path / "bad-ubyte"
  bad.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
  with pytest.raises(ValueError, match="idx"):
    fashion_mnist_local.read_idx(bad)
  good = tmp_path / "ok-ubyte"
  good.write_bytes(b"\x00\x00\x08\x02" + (2).to_bytes(4, "big") * 2 + bytes(range(4)))
  np.testing.assert_array_equal(fashion_mnist_local.read_idx(good), [[0, 1], [2, 3]])


# ------------------------------------------------------------ digits fallback


def test_fallback_to_digits_when_fashion_mnist_is_absent(monkeypatch, tmp_path, capsys):
  monkeypatch.setattr(data, "FASHION_MNIST_DIR", str(tmp_path / "missing"))
  train = data.load("fashion_mnist", "train", str(tmp_path / "empty"))
  assert "falling back" in capsys.readouterr().out
  test = data.load("fashion_mnist", "test", str(tmp_path / "empty"))
  assert "digits" in train.origin
  # The data actually read is named, not the one asked for.
  assert (train.dataset, test.dataset) == ("digits", "digits")
  assert train.spec.name == "fashion_mnist" and "'digits'" in repr(train)
  assert data.load("digits", "test").dataset == "digits"
  assert (len(train), len(test)) == (1500, 297)
  assert train.input_shape == (28, 28, 1)
  assert not os.path.exists(tmp_path / "empty" / fashion_mnist_local.NAME)

  batch = data.Batches(train, 100, seed=1).batch_at(0)
  assert batch["image"].shape == (100, 28, 28, 1)
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert set(np.unique(batch["label"])) <= set(range(10))
  labels = np.asarray([r["label"] for r in train.__getitems__(range(len(train)))])
  assert set(labels) == set(range(10))


def test_digits_are_upsampled_and_padded_to_28x28():
  image = np.arange(64).reshape(1, 8, 8) % 17
  out = digits.to_fashion_mnist_shape(image)
  assert out.shape == (1, 28, 28, 1) and out.dtype == np.uint8
  assert out[0, :2].max() == 0 and out[0, :, -2:].max() == 0  # Zero border.
  # Pixel (r, c) of the 8x8 image fills the 3x3 block at (2 + 3r, 2 + 3c).
  np.testing.assert_array_equal(
    out[0, 2 + 3 * 5 : 5 + 3 * 5, 2 + 3 * 6 : 5 + 3 * 6, 0],
    np.full((3, 3), round(image[0, 5, 6] * 255 / 16)),
  )
  with pytest.raises(ValueError, match="train"):
    digits.load_split("validation")


# ------------------------------------------------------------ production TFDS path


def test_production_path_reads_array_record_through_tfds(tiny_dir):
  source = data.load(tiny_cifar_config(tiny_dir), "train")
  assert len(source) == 40
  assert "ArrayRecord" in type(source.records).__name__
  record = source[0]
  assert record["image"].shape == (32, 32, 3) and record["image"].dtype == np.uint8

  # Evaluation batches are the normalised records, in order.
  test = data.load(tiny_cifar_config(tiny_dir), "test")
  first = data.Batches(test, 8, train=False, process_count=1, process_index=0)
  batch = next(first)
  raw = np.stack([test[i]["image"] for i in range(8)])
  np.testing.assert_allclose(
    batch["image"],
    augment.normalize(raw, data.SPECS["cifar10"].mean, data.SPECS["cifar10"].std),
    rtol=1e-6,
  )
  np.testing.assert_array_equal(batch["label"], [test[i]["label"] for i in range(8)])


def test_missing_dataset_fails_fast_with_instructions(tmp_path):
  start = time.perf_counter()
  with pytest.raises(data.DatasetNotFoundError) as e:
    data.load("cifar10", "train", str(tmp_path))
  assert time.perf_counter() - start < 1.0
  message = str(e.value)
  assert "tfds build cifar10" in message and str(tmp_path) in message
  assert "array_record" in message
  assert isinstance(e.value, ValueError)

  with pytest.raises(data.DatasetNotFoundError, match="downloads/manual"):
    data.load({"dataset": "imagenet2012", "data_dir": str(tmp_path)}, "train")


def test_dataset_in_another_format_is_reported(tmp_path):
  folder = tmp_path / "cifar10" / "3.0.2"
  folder.mkdir(parents=True)
  (folder / "dataset_info.json").write_text("{}")
  (folder / "cifar10-train.tfrecord-00000-of-00001").write_bytes(b"")
  start = time.perf_counter()
  with pytest.raises(data.DatasetNotFoundError, match="array_record"):
    data.load("cifar10", "train", str(tmp_path))
  assert time.perf_counter() - start < 1.0


def test_unknown_dataset_is_rejected():
  with pytest.raises(ValueError, match="Unknown dataset"):
    data.load("mnist_typo", "train")


def test_metadata():
  assert data.num_classes("imagenet2012") == 1000
  assert data.input_shape("cifar10") == (32, 32, 3)
  assert data.input_shape({"dataset": "imagenet2012", "image_size": 128}) == (128, 128, 3)
  assert data.input_shape({"dataset": "fashion_mnist", "image_size": None}) == (28, 28, 1)


def test_default_data_dir(monkeypatch, tmp_path):
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
  assert data.default_data_dir() == str(tmp_path)
  monkeypatch.delenv(data.DATA_DIR_ENV)
  monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
  assert data.default_data_dir().endswith("tensorflow_datasets")


# ------------------------------------------------------------ batching


def test_batches_are_deterministic_and_resumable():
  source = digits_source()
  run = data.Batches(source, 64, seed=3, process_count=1, process_index=0)
  batches = [next(run) for _ in range(30)]  # Crosses an epoch boundary (1500 / 64).
  assert run.step == 30
  resumed = data.Batches(source, 64, seed=3, start_step=25, process_count=1, process_index=0)
  for k in range(25, 30):
    got = next(resumed)
    for key in ("image", "label"):
      np.testing.assert_array_equal(got[key], batches[k][key])
  other_seed = data.Batches(source, 64, seed=4, process_count=1, process_index=0)
  assert not np.array_equal(
    other_seed.batch_at(0)["label"], batches[0]["label"]
  ) or not np.array_equal(other_seed.batch_at(0)["image"], batches[0]["image"])


def test_batch_indices_cover_each_epoch_once():
  n, b = 10, 4
  seen = np.concatenate(
    [data.batch_indices(s, num_examples=n, batch_size=b, seed=1) for s in range(5)]
  )  # 20 positions = 2 epochs.
  assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
  assert not np.array_equal(seen[:10], seen[10:])  # A new permutation per epoch.
  ordered = data.batch_indices(2, num_examples=n, batch_size=b, shuffle=False)
  np.testing.assert_array_equal(ordered, [8, 9, 0, 1])


@given(
  n=st.integers(1, 50),
  local=st.integers(1, 8),
  hosts=st.integers(1, 4),
  step=st.integers(0, 100),
  seed=st.integers(0, 2**31 - 1),
)
def test_host_slices_partition_the_global_batch(n, local, hosts, step, seed):
  batch = local * hosts
  whole = data.batch_indices(step, num_examples=n, batch_size=batch, seed=seed)
  parts = [
    data.batch_indices(
      step, num_examples=n, batch_size=batch, seed=seed, process_index=h, process_count=hosts
    )
    for h in range(hosts)
  ]
  np.testing.assert_array_equal(np.concatenate(parts), whole)
  assert whole.min() >= 0 and whole.max() < n
  # Within one epoch no example repeats.
  positions = data.batch_positions(step, batch)
  for epoch in np.unique(positions // n):
    sel = whole[positions // n == epoch]
    assert len(np.unique(sel)) == len(sel)


def test_per_host_sharding(monkeypatch, tiny_dir):
  source = data.load(tiny_cifar_config(tiny_dir), "train")
  whole = data.Batches(source, 16, seed=2, process_index=0, process_count=1)
  for step in (0, 3):
    expected = whole.batch_at(step)
    parts = []
    for host in range(4):
      monkeypatch.setattr(jax, "process_index", lambda h=host: h)
      monkeypatch.setattr(jax, "process_count", lambda: 4)
      local = data.Batches(source, 16, seed=2)
      assert (local.process_index, local.local_batch_size) == (host, 4)
      parts.append(local.batch_at(step))
    for key in ("image", "label"):  # Same examples *and* same augmentation.
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), expected[key])
  with pytest.raises(ValueError, match="divisible"):
    data.Batches(source, 10, process_index=0, process_count=4)


def test_eval_batches_pad_the_last_batch_with_a_mask(tiny_dir):
  test = data.load(tiny_cifar_config(tiny_dir), "test")  # 20 examples.
  batches = list(data.Batches(test, 8, train=False, process_index=0, process_count=1))
  assert [int(b["mask"].sum()) for b in batches] == [8, 8, 4]
  assert all(b["image"].shape == (8, 32, 32, 3) for b in batches)
  labels = np.concatenate([b["label"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(labels, [test[i]["label"] for i in range(20)])
  host1 = list(data.Batches(test, 8, train=False, process_index=1, process_count=2))
  assert [int(b["mask"].sum()) for b in host1] == [4, 4, 0]


def test_config_helpers_and_threads_give_the_same_batches(tiny_dir):
  config = tiny_cifar_config(tiny_dir)
  a = data.train_batches(config, start_step=2, process_index=0, process_count=1)
  b = data.train_batches(config, start_step=2, process_index=0, process_count=1, num_threads=3)
  x, y = next(a), next(b)
  for key in ("image", "label"):
    np.testing.assert_array_equal(x[key], y[key])
  ev = data.eval_batches(config, process_index=0, process_count=1)
  assert ev.num_steps == 3 and not ev.train


def test_prefetch_keeps_order_and_reraises():
  assert list(data.prefetch(iter(range(7)), 2)) == list(range(7))

  def broken():
    yield 1
    raise RuntimeError("boom")

  it = data.prefetch(broken(), 2)
  assert next(it) == 1
  with pytest.raises(RuntimeError, match="boom"):
    next(it)


# ------------------------------------------------------------ augmentation


def test_cifar_pad_crop_flip():
  images = np.arange(2 * 4 * 4 * 1, dtype=np.uint8).reshape(2, 4, 4, 1) + 1
  centred = augment.pad_crop_flip(images, [2, 2], [2, 2], [False, False], pad=2)
  np.testing.assert_array_equal(centred, images)
  shifted = augment.pad_crop_flip(images, [0, 4], [0, 4], [False, True], pad=2)
  assert shifted[0, :2].max() == 0 and shifted[0, :, :2].max() == 0
  np.testing.assert_array_equal(shifted[0, 2:, 2:], images[0, :2, :2])
  # Image 1 is cropped at the bottom-right, then flipped left-right.
  np.testing.assert_array_equal(shifted[1, :2, 2:], images[1, 2:, 2:][:, ::-1])
  assert shifted[1, 2:].max() == 0 and shifted[1, :, :2].max() == 0


def test_cifar_augmentation_shapes_ranges_determinism(tiny_dir):
  source = data.load(tiny_cifar_config(tiny_dir), "train")
  spec = data.SPECS["cifar10"]
  lo = (0.0 - np.asarray(spec.mean)) / np.asarray(spec.std)
  hi = (1.0 - np.asarray(spec.mean)) / np.asarray(spec.std)
  run = lambda: data.Batches(source, 8, seed=7, process_index=0, process_count=1)
  x, y = run().batch_at(4), run().batch_at(4)
  np.testing.assert_array_equal(x["image"], y["image"])
  assert x["image"].shape == (8, 32, 32, 3) and x["image"].dtype == np.float32
  assert np.all(x["image"] >= lo - 1e-5) and np.all(x["image"] <= hi + 1e-5)
  # Augmented training images differ from the plain normalised ones.
  plain = source.preprocessor(train=False)(
    [source[int(i)]["image"] for i in data.batch_indices(4, num_examples=40, batch_size=8, seed=7)],
    {},
  )
  assert plain.shape == x["image"].shape and not np.array_equal(plain, x["image"])


def test_random_resized_crop_box():
  rng = np.random.default_rng(0)
  draws = augment.imagenet_draws(rng, 200)
  for i in range(200):
    h, w = 100 + i, 300 - i
    top, left, ch, cw = augment.random_resized_crop_box(
      h, w, draws["scale"][i], draws["log_ratio"][i], draws["u"][i], draws["v"][i]
    )
    assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
    assert 0.07 * h * w <= ch * cw <= h * w
  # No draw fits a 1000x10 image: fall back to a central crop of ratio 3/4.
  box = augment.random_resized_crop_box(1000, 10, [1.0] * 3, [1.0] * 3, [0.5] * 3, [0.5] * 3)
  assert box == ((1000 - 13) // 2, 0, 13, 10)


def test_imagenet_eval_resize_and_centre_crop():
  image = np.zeros((300, 400, 3), np.uint8)
  image[:, 200:] = 255  # Right half white.
  out = augment.imagenet_eval_image(image, 224)
  assert out.shape == (224, 224, 3) and out.dtype == np.uint8
  # Shorter side to 256 (width 341), crop 224 centred: the boundary stays central.
  assert out[:, :100].max() == 0 and out[:, 124:].min() == 255
  gray = augment.imagenet_eval_image(np.full((50, 60), 7, np.uint8), 16)
  assert gray.shape == (16, 16, 3) and np.all(gray == 7)


def test_imagenet_pipeline_through_tfds(tiny_dir):
  config = {
    "dataset": "imagenet2012",
    "tfds_name": "jaxprune_tiny_imagenet",
    "data_dir": tiny_dir,
    "batch_size": 6,
    "image_size": 32,
    "seed": 0,
  }
  train = data.load(config, "train")
  assert train[0]["image"].ndim == 3  # Decoded from JPEG without TensorFlow.
  batches = data.train_batches(config, process_index=0, process_count=1)
  x = batches.batch_at(1)
  assert x["image"].shape == (6, 32, 32, 3) and x["image"].dtype == np.float32
  assert np.all(np.isfinite(x["image"]))
  np.testing.assert_array_equal(
    x["image"], data.train_batches(config, process_index=0, process_count=1).batch_at(1)["image"]
  )
  assert not np.array_equal(x["image"], batches.batch_at(2)["image"])
  ev = list(data.eval_batches(config, process_index=0, process_count=1))
  assert [b["image"].shape for b in ev] == [(6, 32, 32, 3)]
  assert int(ev[0]["mask"].sum()) == 5
  np.testing.assert_array_equal(ev[0]["label"][:5] % 100, 0)
