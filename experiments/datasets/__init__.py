"""Building blocks of the input pipeline; `experiments.data` is the entry module.

- `fashion_mnist_local`: a TFDS builder that writes the Debian-packaged
  Fashion-MNIST files as array_record (no TensorFlow needed).
- `digits`: scikit-learn's bundled 8x8 digits, the last-resort offline data.
- `augment`: numpy preprocessing and augmentation (CIFAR, ImageNet).
- `batching`: deterministic, resumable, per-host batching of random-access sources.
"""
