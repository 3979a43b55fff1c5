"""Deterministic, resumable, per-host batching of random-access sources.

A training run sees an infinite stream: the concatenation of one permutation of
the examples per epoch, each drawn from `(seed, epoch)`. Global batch `step` is
stream positions `[step * batch_size, (step + 1) * batch_size)` (a batch may span
two epochs). Everything about a batch -- which examples, which augmentation -- is a
pure function of `(seed, step)`, so a run restored at step k sees exactly the batch
it would have seen, and `jax.process_count()` hosts each read their contiguous
slice of every global batch and together see the same data as one host.
"""

from __future__ import annotations

import concurrent.futures
import functools
import queue
import threading
from typing import Any, Iterator

import jax
import numpy as np

_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  rng = np.random.default_rng(np.random.SeedSequence([seed, _SHUFFLE_STREAM, epoch]))
  perm = rng.permutation(num_examples)
  perm.flags.writeable = False
  return perm


def host_slice(batch_size: int, process_index: int, process_count: int) -> slice:
  """The rows of a global batch that host `process_index` reads."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"Invalid process_index={process_index}, process_count={process_count}.")
  if batch_size % process_count:
    raise ValueError(
      f"batch_size={batch_size} is not divisible by the number of processes "
      f"({process_count}); each host must read an equal slice."
    )
  local = batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


def batch_positions(
  step: int, batch_size: int, process_index: int = 0, process_count: int = 1
) -> np.ndarray:
  """Stream positions of this host's part of global batch `step`."""
  if step < 0:
    raise ValueError(f"step must be >= 0, got {step}.")
  positions = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
  return positions[host_slice(batch_size, process_index, process_count)]


def batch_indices(
  step: int,
  *,
  num_examples: int,
  batch_size: int,
  seed: int = 0,
  shuffle: bool = True,
  process_index: int = 0,
  process_count: int = 1,
) -> np.ndarray:
  """Example indices of this host's part of global batch `step`.

  With `shuffle`, position p maps to `perm(seed, p // n)[p % n]`; without, to
  `p % n` (in order, wrapping around).
  """
  if num_examples < 1:
    raise ValueError("Cannot batch an empty dataset.")
  positions = batch_positions(step, batch_size, process_index, process_count)
  if not shuffle:
    return positions % num_examples
  epochs, offsets = np.divmod(positions, num_examples)
  out = np.empty_like(positions)
  for epoch in np.unique(epochs):
    sel = epochs == epoch
    out[sel] = _epoch_permutation(int(seed), int(epoch), num_examples)[offsets[sel]]
  return out


def augment_rng(seed: int, step: int) -> np.random.Generator:
  """The generator of all augmentation draws of global batch `step`."""
  return np.random.default_rng(np.random.SeedSequence([seed, _AUGMENT_STREAM, step]))


class Batches:
  """Iterator of numpy batches `{"image": float32, "label": int32}` of a source.

  Args:
    source: random-access records (`len`, `__getitems__` or `__getitem__`), such
      as `experiments.data.load(...)` or `tfds.data_source(...)`.
    batch_size: the *global* batch size; each host gets
      `batch_size // process_count` rows.
    seed: shuffling and augmentation seed.
    start_step: the step of the first batch (resume from a checkpoint with the
      checkpointed step).
    train: shuffled infinite stream with augmentation; otherwise one pass in
      order, without augmentation, of `ceil(len(source) / batch_size)` batches,
      the last padded to full size, with a boolean "mask" that is False on padding.
    preprocess: an `augment.Preprocess`-like object; by default
      `source.preprocessor(train=train, image_size=image_size)`.
    image_size: output size for sources whose preprocessing resizes (ImageNet).
    process_index, process_count: this host and the number of hosts; default
      `jax.process_index()` and `jax.process_count()`.
    num_threads: > 1 reads and preprocesses a batch in that many chunks in
      parallel threads (decoding and resizing release the GIL); same result.

  `batch_at(step)` is a pure function of the step; iteration yields
  `batch_at(start_step), batch_at(start_step + 1), ...`, and `.step` is the step
  of the next batch.
  """

  def __init__(
    self,
    source,
    batch_size: int,
    *,
    seed: int = 0,
    start_step: int = 0,
    train: bool = True,
    preprocess: Any = None,
    image_size: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int = 0,
  ):
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}.")
    self.source = source
    self.num_examples = len(source)
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.train = bool(train)
    self.step = int(start_step)
    if process_count is None:
      process_count = jax.process_count()
    if process_index is None:
      process_index = jax.process_index()
    self.process_index, self.process_count = int(process_index), int(process_count)
    self._rows = host_slice(self.batch_size, self.process_index, self.process_count)
    if preprocess is None:
      preprocess = source.preprocessor(train=self.train, image_size=image_size)
    self.preprocess = preprocess
    self.num_threads = int(num_threads)
    self.num_steps = None if self.train else -(-self.num_examples // self.batch_size)

  @property
  def local_batch_size(self) -> int:
    return self.batch_size // self.process_count

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """This host's part of global batch `step` (deterministic)."""
    indices = batch_indices(
      step,
      num_examples=self.num_examples,
      batch_size=self.batch_size,
      seed=self.seed,
      shuffle=self.train,
      process_index=self.process_index,
      process_count=self.process_count,
    )
    draws = self.preprocess.draws(augment_rng(self.seed, step), self.batch_size)
    draws = {k: v[self._rows] for k, v in draws.items()}
    batch = self._read(indices, draws)
    if not self.train:
      positions = batch_positions(step, self.batch_size, self.process_index, self.process_count)
      batch["mask"] = positions < self.num_examples
    return batch

  def _read(self, indices: np.ndarray, draws: dict) -> dict[str, np.ndarray]:
    def chunk(lo: int, hi: int):
      records = _get_records(self.source, indices[lo:hi])
      images = [r["image"] for r in records]
      labels = np.asarray([r["label"] for r in records], dtype=np.int32)
      return self.preprocess(images, {k: v[lo:hi] for k, v in draws.items()}), labels

    n = len(indices)
    threads = max(1, min(self.num_threads, n))
    if threads == 1:
      images, labels = chunk(0, n)
    else:
      bounds = np.linspace(0, n, threads + 1).astype(int)
      with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        parts = list(pool.map(chunk, bounds[:-1], bounds[1:]))
      images = np.concatenate([p[0] for p in parts])
      labels = np.concatenate([p[1] for p in parts])
    return {"image": images, "label": labels}

  def __iter__(self) -> "Batches":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.num_steps is not None and self.step >= self.num_steps:
      raise StopIteration
    batch = self.batch_at(self.step)
    self.step += 1
    return batch

  def __repr__(self) -> str:
    return (
      f"Batches(batch_size={self.batch_size}, seed={self.seed}, "
      f"step={self.step}, train={self.train}, "
      f"host={self.process_index}/{self.process_count})"
    )


def _get_records(source, indices: np.ndarray) -> list:
  getitems = getattr(source, "__getitems__", None)
  if getitems is not None:
    return list(getitems([int(i) for i in indices]))
  return [source[int(i)] for i in indices]


def prefetch(iterator: Iterator, size: int = 2) -> Iterator:
  """Runs `iterator` `size` items ahead in a background thread; same items, in order.

  Exceptions raised by the iterator are re-raised in the consumer.
  """
  if size < 1:
    yield from iterator
    return
  buffer: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()
  done = object()

  def producer():
    try:
      for item in iterator:
        while not stop.is_set():
          try:
            buffer.put((True, item), timeout=0.1)
            break
          except queue.Full:
            continue
        if stop.is_set():
          return
      buffer.put((True, done))
    except BaseException as e:  # Re-raised in the consumer.
      buffer.put((False, e))

  thread = threading.Thread(target=producer, daemon=True)
  thread.start()
  try:
    while True:
      ok, item = buffer.get()
      if not ok:
        raise item
      if item is done:
        return
      yield item
  finally:
    stop.set()
