"""The CNN of `fmnist_cnn` trained with the CIFAR-10 recipe of the RigL paper.

Evci, Gale, Menick, Castro & Elsen (2020), "Rigging the Lottery: Making All
Tickets Winners", ICML, CIFAR-10 setup, scaled to Fashion-MNIST on a CPU:

- Optimisation as the paper's CIFAR runs (and `common.cifar10_rigl_config`): SGD
  with Nesterov momentum 0.9, batch 128, lr 0.1 divided by 5 at the same
  fractions of training (30k, 60k, 90k of 97,656 steps), L2 weight decay 5e-4 on
  kernels; plus a linear warm-up over the first 2.5% of steps (the paper warms up
  on ImageNet; here it keeps lr 0.1 from diverging at step 0 with BatchNorm off
  its running statistics).
- Sparse training: RigL at 90% (sweeps set 80-98%), ERK, mask updates every 100
  steps (dT = 100), drop fraction 0.3 with cosine decay, updates ending at 75% of
  training and none afterwards.
- Length: `steps` = 469 (one epoch of 60,000 images) is the base length, far
  short of the paper's 250 epochs: the whole sweep (5 algorithms x 4
  sparsities x 3 seeds, plus SET and RigL at 3x) is ~120 base runs, which must
  fit a few hours of a small CPU machine. With dT = 100 and updates ending at
  75%, a base run makes only 3 mask updates (at steps 100, 200, 300) and a 3x run
  (`--config.steps=1407`) 10. Every schedule above follows `steps`.
- Model: two Conv 3x3 -> BatchNorm -> ReLU -> max-pool stages (32, 64 channels),
  Dense 128, Dense 10 (`experiments.models.CNN`).
"""

from experiments.configs import common, fmnist_cnn

EPOCH_STEPS = 469  # ceil(60,000 / 128)


def get_config():
  c = fmnist_cnn.get_config()  # Data and model.
  c.name = "fmnist_cnn_rigl_protocol"
  c.workdir = f"/tmp/jaxprune/{c.name}"
  c.steps = EPOCH_STEPS
  common.apply_rigl_cifar_recipe(c)
  c.start_step = 0
  c.warmup_steps = common.fraction_of_steps(c, 0.025)
  return c
