"""scikit-learn's bundled 8x8 digits, shaped like Fashion-MNIST: the last resort.

The UCI optical digits (Alpaydin & Kaynak, 1998; shipped inside scikit-learn as
`load_digits`) are 1797 8x8 images with pixel values 0..16. So that every
Fashion-MNIST config and model runs unchanged on them, each image is upsampled 3x
(nearest neighbour, 24x24), zero-padded by 2 pixels to 28x28x1 and rescaled to uint8
0..255. The split is fixed: a seed-0 permutation, the last 297 examples as "test"
and the first 1500 as "train".
"""

from __future__ import annotations

import numpy as np

NUM_TEST = 297
SHAPE = (28, 28, 1)


class ArraySource:
  """An in-memory random-access source with the interface of a TFDS data source.

  `len(source)`, `source[i]` and `source.__getitems__(indices)` return records
  (dicts of numpy values), like `tfds.data_source`.
  """

  def __init__(self, arrays: dict[str, np.ndarray]):
    lengths = {len(v) for v in arrays.values()}
    if len(lengths) != 1:
      raise ValueError(f"Arrays of different lengths: {lengths}")
    self._arrays = arrays
    self._length = lengths.pop()

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict:
    if not -self._length <= index < self._length:
      raise IndexError(index)
    return {k: v[index] for k, v in self._arrays.items()}

  def __getitems__(self, indices) -> list[dict]:
    idx = np.asarray(indices, dtype=np.int64)
    gathered = {k: v[idx] for k, v in self._arrays.items()}
    return [{k: v[i] for k, v in gathered.items()} for i in range(len(idx))]

  def __repr__(self) -> str:
    shapes = {k: v.shape for k, v in self._arrays.items()}
    return f"ArraySource({shapes})"


def to_fashion_mnist_shape(images_8x8: np.ndarray) -> np.ndarray:
  """(n, 8, 8) values 0..16 -> (n, 28, 28, 1) uint8 0..255 (3x upsample, pad 2)."""
  images = np.asarray(images_8x8, dtype=np.float64).reshape(-1, 8, 8)
  images = np.rint(images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
  images = images.repeat(3, axis=1).repeat(3, axis=2)
  images = np.pad(images, ((0, 0), (2, 2), (2, 2)))
  return images[..., None]


def load_split(split: str) -> ArraySource:
  """The "train" (1500) or "test" (297) split of the digits, 28x28x1 uint8."""
  if split not in ("train", "test"):
    raise ValueError(f"The digits fallback has splits 'train' and 'test', not {split!r}.")
  from sklearn.datasets import load_digits  # Bundled with scikit-learn: no network.

  bunch = load_digits()
  order = np.random.default_rng(0).permutation(len(bunch.target))
  order = order[:-NUM_TEST] if split == "train" else order[-NUM_TEST:]
  return ArraySource(
    {
      "image": to_fashion_mnist_shape(bunch.images[order]),
      "label": bunch.target[order].astype(np.int64),
    }
  )
