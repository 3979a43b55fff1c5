"""Numpy preprocessing and augmentation, deterministic given explicit random draws.

Randomness is split in two so that batches are identical however many hosts share
them: `*_draws(rng, n)` makes every random number for a *global* batch of `n`
examples (a dict of arrays with leading dimension `n`); each host slices its own rows
and passes them to the matching transform, which is a pure function.

- CIFAR (He et al., 2016, "Deep Residual Learning for Image Recognition", Sec. 4.2):
  zero-pad 4 pixels, random 32x32 crop, random horizontal flip; per-channel mean/std
  normalisation.
- ImageNet (Szegedy et al., 2015, "Going Deeper with Convolutions"; the
  random-resized crop as in torchvision and Goyal et al., 2017): a crop covering
  8%-100% of the area with aspect ratio in [3/4, 4/3] resized to `size`, random
  horizontal flip; for evaluation resize the shorter side to `size / 0.875` and take
  the central `size` x `size` crop.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

CIFAR_PAD = 4
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RRC_ATTEMPTS = 10
EVAL_CROP_FRACTION = 0.875


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
  """uint8 0..255 images -> float32 `(images / 255 - mean) / std` per channel."""
  mean = np.asarray(mean, dtype=np.float32)
  std = np.asarray(std, dtype=np.float32)
  return (np.asarray(images, dtype=np.float32) / np.float32(255.0) - mean) / std


# ----------------------------------------------------------------------------- CIFAR


def cifar_draws(rng: np.random.Generator, n: int, pad: int = CIFAR_PAD) -> dict:
  """Crop offsets in [0, 2 * pad] and flip bits for `n` examples."""
  return {
    "dy": rng.integers(0, 2 * pad + 1, size=n),
    "dx": rng.integers(0, 2 * pad + 1, size=n),
    "flip": rng.random(n) < 0.5,
  }


def pad_crop_flip(images: np.ndarray, dy, dx, flip, pad: int = CIFAR_PAD) -> np.ndarray:
  """Zero-pads (b, h, w, c) images by `pad`, crops h x w at (dy, dx), flips.

  Vectorised: no Python loop over the batch.
  """
  images = np.asarray(images)
  b, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(1, 2))
  # windows: (b, 2*pad+1, 2*pad+1, c, h, w)
  crops = windows[np.arange(b), np.asarray(dy), np.asarray(dx)]
  crops = np.moveaxis(crops, 1, -1)  # (b, h, w, c)
  flip = np.asarray(flip, dtype=bool)[:, None, None, None]
  return np.where(flip, crops[:, :, ::-1], crops)


# -------------------------------------------------------------------------- ImageNet


def imagenet_draws(rng: np.random.Generator, n: int, attempts: int = RRC_ATTEMPTS) -> dict:
  """Uniform draws for `attempts` random-resized-crop tries, plus a flip bit."""
  log_lo, log_hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
  return {
    "scale": rng.uniform(RRC_SCALE[0], RRC_SCALE[1], size=(n, attempts)),
    "log_ratio": rng.uniform(log_lo, log_hi, size=(n, attempts)),
    "u": rng.random((n, attempts)),
    "v": rng.random((n, attempts)),
    "flip": rng.random(n) < 0.5,
  }


def random_resized_crop_box(
  height: int, width: int, scale, log_ratio, u, v
) -> tuple[int, int, int, int]:
  """The (top, left, crop_height, crop_width) of a random-resized crop.

  Tries each (scale, log_ratio) draw in turn and takes the first crop that fits,
  its position given by the uniform draws (u, v). If none fits, falls back to
  the largest central crop whose aspect ratio lies in [3/4, 4/3].
  """
  area = height * width
  for s, lr, uu, vv in zip(scale, log_ratio, u, v):
    ratio = math.exp(lr)
    w = int(round(math.sqrt(area * s * ratio)))
    h = int(round(math.sqrt(area * s / ratio)))
    if 0 < w <= width and 0 < h <= height:
      top = min(int(uu * (height - h + 1)), height - h)
      left = min(int(vv * (width - w + 1)), width - w)
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < RRC_RATIO[0]:
    w, h = width, int(round(width / RRC_RATIO[0]))
  elif in_ratio > RRC_RATIO[1]:
    h, w = height, int(round(height * RRC_RATIO[1]))
  else:
    h, w = height, width
  h, w = min(h, height), min(w, width)
  return (height - h) // 2, (width - w) // 2, h, w


def _as_rgb(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image, dtype=np.uint8)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return image


def _resize_box(
  image: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int]
) -> np.ndarray:
  """Crops `box` = (top, left, h, w) and resizes it to `size` = (h, w), bilinear."""
  top, left, h, w = box
  pil = Image.fromarray(image)
  out = pil.resize((size[1], size[0]), Image.BILINEAR, box=(left, top, left + w, top + h))
  return np.asarray(out, dtype=np.uint8)


def imagenet_train_image(image: np.ndarray, draws: dict, size: int) -> np.ndarray:
  """Random-resized crop to `size` x `size` and optional flip; uint8 out.

  `draws` holds one example's row of `imagenet_draws`.
  """
  image = _as_rgb(image)
  box = random_resized_crop_box(
    image.shape[0], image.shape[1], draws["scale"], draws["log_ratio"], draws["u"], draws["v"]
  )
  out = _resize_box(image, box, (size, size))
  return out[:, ::-1] if draws["flip"] else out


def imagenet_eval_image(
  image: np.ndarray, size: int, crop_fraction: float = EVAL_CROP_FRACTION
) -> np.ndarray:
  """Resizes the shorter side to `round(size / crop_fraction)`, centre-crops `size`."""
  image = _as_rgb(image)
  height, width = image.shape[:2]
  resize = int(round(size / crop_fraction))
  scale = resize / min(height, width)
  new_h = max(size, int(round(height * scale)))
  new_w = max(size, int(round(width * scale)))
  resized = _resize_box(image, (0, 0, height, width), (new_h, new_w))
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return resized[top : top + size, left : left + size]


# ------------------------------------------------------------------ whole pipelines

KINDS = ("none", "cifar", "imagenet")


class Preprocess:
  """Turns a list of raw uint8 images into a normalised float32 batch.

  `kind` is "none" (normalise only), "cifar" or "imagenet"; `train` switches the
  random augmentation on (and, for ImageNet, random-resized crop instead of the
  central crop). `draws(rng, n)` returns the random numbers of a global batch of
  `n`; `__call__(images, draws)` is deterministic given those rows.
  """

  def __init__(self, kind: str, *, train: bool, mean, std, image_size: int | None = None):
    if kind not in KINDS:
      raise ValueError(f"Unknown preprocessing kind {kind!r}; one of {KINDS}.")
    if kind == "imagenet" and not image_size:
      raise ValueError("ImageNet preprocessing needs an image_size.")
    self.kind, self.train = kind, bool(train)
    self.mean, self.std = tuple(mean), tuple(std)
    self.image_size = image_size

  def draws(self, rng: np.random.Generator, n: int) -> dict:
    if not self.train or self.kind == "none":
      return {}
    if self.kind == "cifar":
      return cifar_draws(rng, n)
    return imagenet_draws(rng, n)

  def __call__(self, images, draws: dict) -> np.ndarray:
    if self.kind == "imagenet":
      if self.train:
        rows = [{k: v[i] for k, v in draws.items()} for i in range(len(images))]
        out = [imagenet_train_image(im, row, self.image_size) for im, row in zip(images, rows)]
      else:
        out = [imagenet_eval_image(im, self.image_size) for im in images]
      batch = np.stack(out)
    else:
      batch = np.stack([np.asarray(im) for im in images])
      if batch.ndim == 3:
        batch = batch[..., None]
      if self.kind == "cifar" and self.train:
        batch = pad_crop_flip(batch, draws["dy"], draws["dx"], draws["flip"])
    return normalize(batch, self.mean, self.std)

  def __repr__(self) -> str:
    return f"Preprocess({self.kind!r}, train={self.train}, image_size={self.image_size})"
