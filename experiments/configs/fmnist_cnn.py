"""A small Conv-BN-ReLU CNN on Fashion-MNIST trained sparse from scratch with RigL.

- Model: two Conv 3x3 -> BatchNorm (Ioffe & Szegedy, 2015) -> ReLU -> max-pool
  stages (32, 64 channels) then Dense 128 and Dense 10; each conv has its own
  BatchNorm so it can also be channel-pruned and compacted.
- Data: Fashion-MNIST (Xiao et al., 2017, arXiv:1708.07747), offline.
- Sparse training: RigL (Evci et al., 2020, "Rigging the Lottery: Making All Tickets
  Winners", ICML) at 80% sparsity with the ERK distribution, mask updates every 100
  steps, drop fraction 0.3, updates stopping at 75% of training.
- Optimisation: Adam (Kingma & Ba, 2015), lr 1e-3 with cosine decay (Loshchilov &
  Hutter, 2017), batch 128, 4000 steps (~8.5 epochs).
"""

from experiments.configs import common


def get_config():
  c = common.fashion_mnist_config("fmnist_cnn", "cnn", steps=4000)
  c.model_kwargs.channels = (32, 64)
  c.model_kwargs.hidden = 128
  c.lr_schedule = "cosine"
  return common.use_rigl(c, sparsity=0.8)
