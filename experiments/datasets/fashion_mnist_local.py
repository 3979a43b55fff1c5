"""Fashion-MNIST from local idx files, as a TFDS array_record dataset.

Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017, "Fashion-MNIST: a Novel Image
Dataset for Benchmarking Machine Learning Algorithms", arXiv:1708.07747) is
shipped by Debian's `dataset-fashion-mnist` package as the original four
`*-ubyte.gz` files. This builder reads them from a local folder (the TFDS
"manual_dir") and writes an ordinary TFDS dataset in the array_record format, so
the offline demo reads its data through exactly the same `tfds.data_source` path as
production datasets. Building and reading need no TensorFlow: features are plain
`tfds.features.Tensor`s, the image stored as raw bytes.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import tensorflow_datasets as tfds

NAME = "fashion_mnist_local"
FILES = {
  "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
NUM_EXAMPLES = {"train": 60_000, "test": 10_000}
CLASS_NAMES = (
  "t-shirt/top",
  "trouser",
  "pullover",
  "dress",
  "coat",
  "sandal",
  "shirt",
  "sneaker",
  "bag",
  "ankle boot",
)


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an idx file (optionally gzipped) into a uint8 array of its shape.

  The idx format (LeCun et al., MNIST) is a big-endian header: two zero bytes,
  a type code (0x08 = unsigned byte), the number of dimensions, then one uint32
  per dimension, followed by the raw data.
  """
  path = os.fspath(path)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise ValueError(f"{path} is not an idx file (bad magic number)")
  if data[2] != 0x08:
    raise ValueError(f"{path}: only unsigned-byte idx files are supported")
  ndim = data[3]
  dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
  array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
  if array.size != int(np.prod(dims)):
    raise ValueError(f"{path}: header says {dims}, found {array.size} bytes")
  return array.reshape(dims)


def source_files_present(source_dir: str | os.PathLike) -> bool:
  """Whether all four Fashion-MNIST idx files are in `source_dir`."""
  return all(
    os.path.isfile(os.path.join(source_dir, name)) for pair in FILES.values() for name in pair
  )


class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST read from the original idx.gz files in the manual dir."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Images as raw uint8 bytes, labels as int64."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Install Debian's `dataset-fashion-mnist` package (files under "
    "/usr/share/datasets/fashion-mnist/) or place the four files "
    "{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz in the manual_dir."
  )

  def _info(self) -> tfds.core.DatasetInfo:
    # `DatasetInfo(builder=self, ...)` directly: `dataset_info_from_configs`
    # looks for metadata files next to the module, which we do not ship.
    return tfds.core.DatasetInfo(
      builder=self,
      description=(
        "Fashion-MNIST: 28x28 grayscale images of 10 clothing classes "
        f"({', '.join(CLASS_NAMES)}); 60000 train, 10000 test."
      ),
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Tensor(
            shape=(28, 28, 1), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
          ),
          "label": tfds.features.Tensor(shape=(), dtype=np.int64),
        }
      ),
      supervised_keys=("image", "label"),
      homepage="https://github.com/zalandoresearch/fashion-mnist",
      citation=(
        "@article{xiao2017fashion, title={Fashion-MNIST: a Novel Image "
        "Dataset for Benchmarking Machine Learning Algorithms}, "
        "author={Xiao, Han and Rasul, Kashif and Vollgraf, Roland}, "
        "journal={arXiv:1708.07747}, year={2017}}"
      ),
    )

  def _split_generators(self, dl_manager):
    source_dir = dl_manager.manual_dir
    return {
      split: self._generate_examples(source_dir / images, source_dir / labels)
      for split, (images, labels) in FILES.items()
    }

  def _generate_examples(self, images_path, labels_path):
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
      raise ValueError(f"Unexpected idx shapes {images.shape} and {labels.shape}")
    for i in range(images.shape[0]):
      yield i, {"image": images[i][..., None], "label": int(labels[i])}


def build(data_dir: str, source_dir: str) -> None:
  """Writes `fashion_mnist_local` as array_record into `data_dir` (idempotent).

  Reads the idx.gz files from `source_dir`; touches no network. Takes a few
  seconds; later calls reuse the prepared files.
  """
  if not source_files_present(source_dir):
    raise FileNotFoundError(
      f"Fashion-MNIST idx files not found in {source_dir!r}. "
      + FashionMnistLocal.MANUAL_DOWNLOAD_INSTRUCTIONS
    )
  builder = FashionMnistLocal(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=source_dir))
