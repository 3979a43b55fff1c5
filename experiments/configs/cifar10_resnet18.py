"""ResNet-18 (CIFAR variant) on CIFAR-10 with the RigL CIFAR recipe.

- Model: ResNet-18 (He et al., 2016, "Deep Residual Learning for Image
  Recognition") with the CIFAR stem (one 3x3 conv, no max-pool), 11.2M parameters.
- Recipe: the CIFAR-10 setup of Evci et al. (2020), "Rigging the Lottery: Making
  All Tickets Winners", ICML: SGD (Nesterov momentum 0.9), batch 128, 97,656 steps,
  lr 0.1 divided by 5 at 30k/60k/90k steps, weight decay 5e-4; RigL at 90% sparsity
  (ERK), mask updates every 100 steps, drop fraction 0.3, until 75% of training.
  See `common.cifar10_rigl_config`.
"""

from experiments.configs import common


def get_config():
  c = common.cifar10_rigl_config("cifar10_resnet18", "resnet18")
  c.model_kwargs.num_filters = 64
  return c
