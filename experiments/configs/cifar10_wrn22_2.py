"""WideResNet-22-2 on CIFAR-10 with RigL: the CIFAR recipe of the RigL paper.

- Model: WRN-22-2 (Zagoruyko & Komodakis, 2016, "Wide Residual Networks").
- Recipe: Evci et al. (2020), "Rigging the Lottery: Making All Tickets Winners",
  ICML: SGD (Nesterov momentum 0.9), batch 128, 97,656 steps, lr 0.1 divided by 5
  at 30k/60k/90k steps, weight decay 5e-4; RigL at 90% sparsity (ERK), mask updates
  every 100 steps, drop fraction 0.3, until 75% of training. See `common.cifar10_rigl_config`.
"""

from experiments.configs import common


def get_config():
  c = common.cifar10_rigl_config("cifar10_wrn22_2", "wrn")
  c.model_kwargs.depth = 22
  c.model_kwargs.width = 2
  return c
