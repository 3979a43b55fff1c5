"""Input pipeline of the experiments: datasets as random-access sources, batched.

Production path: `tfds.data_source(name, split=..., data_dir=..., download=False)`
over array_record files (random access, no TensorFlow needed to read). A dataset that
is not prepared in `data_dir` fails at once with `DatasetNotFoundError`, whose message
says how to prepare it; nothing is ever downloaded at run time.

Offline default ("fashion_mnist"): the real Fashion-MNIST (Xiao et al., 2017) from
Debian's `dataset-fashion-mnist` package, written once into `data_dir` by the local
TFDS builder `fashion_mnist_local` and then read through the same `tfds.data_source`
path. Where the package is absent, scikit-learn's bundled 8x8 digits stand in, shaped
28x28x1 like Fashion-MNIST (see `experiments.datasets.digits`), and a line says so.

Typical use by a training script::

    train = data.load(config, "train")                 # a Source
    batches = data.Batches(train, config.batch_size, seed=config.seed,
                           start_step=restored_step)   # resumable, per host
    batch = next(batches)  # {"image": float32 (b, h, w, c), "label": int32 (b,)}

or simply `data.train_batches(config, start_step=...)` and `data.eval_batches(config)`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import numpy as np

from experiments.datasets import augment, digits, fashion_mnist_local
from experiments.datasets.batching import (  # noqa: F401  (re-exported API)
  Batches,
  augment_rng,
  batch_indices,
  batch_positions,
  host_slice,
  prefetch,
)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DATA_DIR_ENV = "JAXPRUNE_DATA_DIR"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetNotFoundError(ValueError):
  """A dataset is not prepared in the data dir; the message says how to prepare it."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the experiments need to know about a dataset.

  Attributes:
    name: the key used in configs (`config.dataset`).
    tfds_name: the TFDS name (optionally "name/config:version") read through
      `tfds.data_source`; None for the in-memory digits.
    num_classes: number of labels.
    image_shape: (height, width, channels) of the model input.
    preprocessing: "none", "cifar" or "imagenet" (see `datasets.augment`).
    mean, std: per-channel normalisation of images scaled to [0, 1].
    train_split, eval_split: TFDS split names.
    prepare: how to prepare the dataset, shown when it is missing.
  """

  name: str
  tfds_name: str | None
  num_classes: int
  image_shape: tuple[int, int, int]
  preprocessing: str = "none"
  mean: tuple[float, ...] = (0.0,)
  std: tuple[float, ...] = (1.0,)
  train_split: str = "train"
  eval_split: str = "test"
  prepare: str = ""


def _build_hint(tfds_name: str) -> str:
  return f"tfds build {tfds_name.split(':')[0]} --data_dir={{data_dir}} --file_format=array_record"


def _cifar(name: str, num_classes: int, mean, std) -> DatasetSpec:
  """A CIFAR spec: 32x32 RGB, the "cifar" augmentation, its per-channel statistics."""
  return DatasetSpec(
    name, name, num_classes, (32, 32, 3), "cifar", mean=mean, std=std, prepare=_build_hint(name)
  )


SPECS: dict[str, DatasetSpec] = {
  "fashion_mnist": DatasetSpec(
    "fashion_mnist",
    fashion_mnist_local.NAME,
    10,
    (28, 28, 1),
    prepare=(
      "install Debian's `dataset-fashion-mnist` package; it is then "
      "converted automatically on first use"
    ),
  ),
  "digits": DatasetSpec("digits", None, 10, (28, 28, 1)),
  "cifar10": _cifar("cifar10", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
  "cifar100": _cifar("cifar100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
  "imagenet2012": DatasetSpec(
    "imagenet2012",
    "imagenet2012",
    1000,
    (224, 224, 3),
    "imagenet",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    eval_split="validation",
    prepare=(
      "put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in "
      "{data_dir}/downloads/manual, then " + _build_hint("imagenet2012")
    ),
  ),
}


# ------------------------------------------------------------------------ data dirs


def default_data_dir() -> str:
  """`$JAXPRUNE_DATA_DIR`, else `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`."""
  for var in (DATA_DIR_ENV, "TFDS_DATA_DIR"):
    if os.environ.get(var):
      return os.path.expanduser(os.environ[var])
  return os.path.expanduser("~/tensorflow_datasets")


def _parse_tfds_name(tfds_name: str) -> tuple[str, str | None]:
  """ "name[/config][:version]" -> ("name[/config]", version or None)."""
  name, _, version = tfds_name.partition(":")
  return name, (version or None)


def _version_key(version: str) -> tuple[int, ...]:
  return tuple(int(p) for p in version.split("."))


def prepared_dir(tfds_name: str, data_dir: str) -> str | None:
  """The prepared version folder of `tfds_name` in `data_dir`, or None.

  A version folder counts as prepared when it holds `dataset_info.json`; without
  an explicit ":version" the newest such folder is returned.
  """
  name, version = _parse_tfds_name(tfds_name)
  root = os.path.join(data_dir, *name.split("/"))
  if version is not None:
    versions = [version]
  elif os.path.isdir(root):
    versions = sorted(
      (v for v in os.listdir(root) if re.fullmatch(r"\d+\.\d+\.\d+", v)),
      key=_version_key,
      reverse=True,
    )
  else:
    versions = []
  for v in versions:
    if os.path.isfile(os.path.join(root, v, "dataset_info.json")):
      return os.path.join(root, v)
  return None


def ensure_prepared(tfds_name: str, data_dir: str, prepare: str = "") -> str:
  """Checks `data_dir` holds `tfds_name` as array_record; returns its folder.

  Raises:
    DatasetNotFoundError: at once (only the local filesystem is looked at) when
      the dataset is missing or was prepared in another file format.
  """
  prepare = (prepare or _build_hint(tfds_name)).format(data_dir=data_dir)
  how = (
    f"Prepare it once: {prepare}. Building may need network access (and, "
    "for most TFDS builders, TensorFlow); reading needs neither, so it can be "
    f"built elsewhere and its folder copied into {data_dir}. Or point "
    f"--config.data_dir (or ${DATA_DIR_ENV}) at a data dir that has it."
  )
  folder = prepared_dir(tfds_name, data_dir)
  if folder is None:
    raise DatasetNotFoundError(
      f"Dataset {tfds_name!r} is not prepared in data_dir {data_dir!r} "
      f"(no {os.path.join(data_dir, _parse_tfds_name(tfds_name)[0])}"
      f"/<version>/dataset_info.json). {how}"
    )
  files = os.listdir(folder)
  if not any(".array_record" in f for f in files):
    found = sorted(f for f in files if not f.endswith(".json"))[:3]
    raise DatasetNotFoundError(
      f"Dataset {tfds_name!r} in {folder} has no array_record files "
      f"(found: {found or 'no data files'}); random access needs "
      f"--file_format=array_record. {how}"
    )
  return folder


def data_source(tfds_name: str, split: str, data_dir: str | None = None, prepare: str = ""):
  """`tfds.data_source` over a prepared array_record dataset; never downloads."""
  import tensorflow_datasets as tfds

  data_dir = data_dir or default_data_dir()
  ensure_prepared(tfds_name, data_dir, prepare)
  try:
    return tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetNotFoundError(f"{tfds_name!r} in {data_dir!r}: {e}") from e


# -------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class Source:
  """A random-access split of a dataset plus what is needed to batch it.

  Behaves like a TFDS data source (`len`, `[i]`, `__getitems__`) returning raw
  records `{"image": uint8 array, "label": int, ...}`; `Batches` turns them into
  normalised (and, for training, augmented) float32 batches.

  `dataset` names the data actually read: the spec's name, except for the
  Fashion-MNIST fallback, which reads "digits" (shaped like Fashion-MNIST).
  Results record it (see `experiments.train`).
  """

  records: Any
  spec: DatasetSpec
  split: str
  origin: str
  dataset: str = ""  # The data actually read; "" means `spec.name`.

  def __post_init__(self):
    if not self.dataset:
      object.__setattr__(self, "dataset", self.spec.name)

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict:
    return self.records[index]

  def __getitems__(self, indices) -> list[dict]:
    getitems = getattr(self.records, "__getitems__", None)
    if getitems is not None:
      return list(getitems(list(indices)))
    return [self.records[int(i)] for i in indices]

  @property
  def num_classes(self) -> int:
    return self.spec.num_classes

  @property
  def input_shape(self) -> tuple[int, int, int]:
    return self.spec.image_shape

  def preprocessor(self, train: bool, image_size: int | None = None) -> augment.Preprocess:
    """The preprocessing of this dataset (augmented when `train`)."""
    if self.spec.preprocessing == "imagenet":
      image_size = image_size or self.spec.image_shape[0]
    return augment.Preprocess(
      self.spec.preprocessing,
      train=train,
      mean=self.spec.mean,
      std=self.spec.std,
      image_size=image_size,
    )

  def __repr__(self) -> str:
    return (
      f"Source({self.dataset!r}, split={self.split!r}, examples={len(self)}, from {self.origin})"
    )


def _field(config: Any, key: str, default: Any = None) -> Any:
  if isinstance(config, Mapping) or hasattr(config, "get"):
    value = config.get(key, default)
  else:
    value = getattr(config, key, default)
  return default if value is None else value


def get_spec(config_or_name: Any) -> DatasetSpec:
  """The `DatasetSpec` of a dataset name or of a config's `dataset`.

  A config's `tfds_name` (if set) replaces the spec's TFDS name, e.g.
  "cifar10:3.0.2" or a custom dataset with the same features.
  """
  if isinstance(config_or_name, str):
    name, tfds_name = config_or_name, None
  else:
    name = _field(config_or_name, "dataset")
    tfds_name = _field(config_or_name, "tfds_name")
  if name not in SPECS:
    raise ValueError(f"Unknown dataset {name!r}; known: {sorted(SPECS)}.")
  spec = SPECS[name]
  if tfds_name:
    spec = dataclasses.replace(spec, tfds_name=tfds_name)
  return spec


def num_classes(config_or_name: Any) -> int:
  """Number of labels of the dataset."""
  return get_spec(config_or_name).num_classes


def input_shape(config_or_name: Any) -> tuple[int, int, int]:
  """(height, width, channels) of one model input; honours `config.image_size`."""
  spec = get_spec(config_or_name)
  size = None if isinstance(config_or_name, str) else _field(config_or_name, "image_size")
  if size and spec.preprocessing == "imagenet":
    return (int(size), int(size), spec.image_shape[2])
  return spec.image_shape


def _load_fashion_mnist(spec: DatasetSpec, split: str, data_dir: str) -> Source:
  name = spec.tfds_name
  if prepared_dir(name, data_dir) is None:
    if fashion_mnist_local.source_files_present(FASHION_MNIST_DIR):
      print(
        f"[data] Converting Fashion-MNIST from {FASHION_MNIST_DIR} to "
        f"{name} (array_record) in {data_dir}; done once.",
        flush=True,
      )
      try:
        fashion_mnist_local.build(data_dir, FASHION_MNIST_DIR)
      except Exception:
        # Another process (a second host on a shared disk, an eval job)
        # may have finished the same conversion first.
        if prepared_dir(name, data_dir) is None:
          raise
    else:
      print(
        f"[data] Fashion-MNIST files not found in {FASHION_MNIST_DIR} "
        "(Debian package dataset-fashion-mnist); falling back to "
        "scikit-learn's 8x8 digits, upsampled and padded to 28x28x1.",
        flush=True,
      )
      return Source(
        digits.load_split(split), spec, split, "scikit-learn digits (fallback)", dataset="digits"
      )
  records = data_source(name, split, data_dir, spec.prepare)
  return Source(records, spec, split, f"tfds {name} in {data_dir}")


def load(config_or_name: Any, split: str = "train", data_dir: str | None = None) -> Source:
  """Opens one split of a dataset as a random-access `Source`.

  Args:
    config_or_name: a dataset name from `SPECS` or a config with `dataset` (and
      optionally `tfds_name`, `data_dir`).
    split: a TFDS split, slices included ("train[:90%]"); the digits fallback
      has "train" and "test" only.
    data_dir: the TFDS data dir; default: the config's `data_dir`, else
      `default_data_dir()`.

  Raises:
    DatasetNotFoundError: the dataset is not prepared in `data_dir`.
  """
  spec = get_spec(config_or_name)
  if data_dir is None and not isinstance(config_or_name, str):
    data_dir = _field(config_or_name, "data_dir")
  data_dir = os.path.expanduser(data_dir or default_data_dir())
  if spec.tfds_name is None:
    return Source(digits.load_split(split), spec, split, "scikit-learn digits")
  if spec.tfds_name == fashion_mnist_local.NAME:
    return _load_fashion_mnist(spec, split, data_dir)
  records = data_source(spec.tfds_name, split, data_dir, spec.prepare)
  return Source(records, spec, split, f"tfds {spec.tfds_name} in {data_dir}")


def train_batches(
  config: Any, *, start_step: int = 0, source: Source | None = None, **kwargs
) -> Batches:
  """Resumable training batches of `config` (its train split, batch size, seed)."""
  source = source if source is not None else load(config, get_spec(config).train_split)
  return Batches(
    source,
    int(_field(config, "batch_size")),
    seed=int(_field(config, "seed", 0)),
    start_step=start_step,
    train=True,
    image_size=_field(config, "image_size"),
    **kwargs,
  )


def eval_batches(
  config: Any, *, split: str | None = None, source: Source | None = None, **kwargs
) -> Batches:
  """One ordered pass over the eval split, padded batches with a "mask"."""
  if source is None:
    source = load(config, split or get_spec(config).eval_split)
  batch_size = int(_field(config, "eval_batch_size") or _field(config, "batch_size"))
  return Batches(
    source,
    batch_size,
    seed=int(_field(config, "seed", 0)),
    train=False,
    image_size=_field(config, "image_size"),
    **kwargs,
  )


def stack_batches(batches) -> dict[str, np.ndarray]:
  """Concatenates an iterable of batches along the first axis (small data only)."""
  batches = list(batches)
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
