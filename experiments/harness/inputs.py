"""The data of a run: the config's dataset splits, small ones read into memory.

Small datasets (fixed-size images, under `IN_MEMORY_MAX_BYTES` of pixels, e.g.
Fashion-MNIST and CIFAR) are read once through their TFDS source into memory;
the batches are the same either way.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from experiments import data

IN_MEMORY_MAX_BYTES = 1 << 28

_MEMORY: dict = {}


def in_memory(source: data.Source, limit: int | None = None) -> data.Source:
  """`source` (its first `limit` examples) read once into numpy arrays (cached
  per process)."""
  from experiments.datasets.digits import ArraySource

  if isinstance(source.records, ArraySource) and not limit:
    return source
  n = len(source) if not limit else min(int(limit), len(source))
  key = (source.origin, source.split, n)
  if key not in _MEMORY:
    images, labels = [], []
    for lo in range(0, n, 4096):
      records = source.__getitems__(range(lo, min(lo + 4096, n)))
      images.append(np.stack([np.asarray(r["image"]) for r in records]))
      labels.append(np.asarray([r["label"] for r in records], np.int64))
    _MEMORY[key] = ArraySource({"image": np.concatenate(images), "label": np.concatenate(labels)})
  return dataclasses.replace(source, records=_MEMORY[key], origin=f"{source.origin}, in memory")


def load_split(config, split: str) -> data.Source:
  """A split of the config's dataset, in memory when small (see module doc)."""
  source = data.load(config, split)
  spec = source.spec
  size = len(source) * math.prod(spec.image_shape)
  if spec.preprocessing != "imagenet" and size <= IN_MEMORY_MAX_BYTES:
    return in_memory(source)
  return source
