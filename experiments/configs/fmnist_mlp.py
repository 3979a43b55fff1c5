"""LeNet-300-100 on Fashion-MNIST with gradual magnitude pruning; CPU-friendly.

- Model: the 784-300-100-10 MLP "LeNet-300-100" (LeCun et al., 1998, "Gradient-Based
  Learning Applied to Document Recognition"), the classic pruning benchmark of
  Han et al. (2015, "Learning both Weights and Connections for Efficient Neural
  Networks").
- Data: Fashion-MNIST (Xiao et al., 2017, arXiv:1708.07747), offline.
- Pruning: gradual magnitude pruning with the cubic schedule of Zhu & Gupta (2017,
  "To prune, or not to prune: exploring the efficacy of pruning for model
  compression"), from 10% to 60% of training, every 100 steps, to 90% sparsity.
- Optimisation: Adam (Kingma & Ba, 2015), lr 1e-3, batch 128, 3000 steps
  (~6.4 epochs; about a minute on a laptop CPU).
"""

from experiments.configs import common


def get_config():
  c = common.fashion_mnist_config("fmnist_mlp", "mlp", steps=3000)  # constant lr
  c.model_kwargs.features = (300, 100)
  c.algorithm = "gradual_magnitude"
  c.sparsity = 0.9
  c.start_step = common.fraction_of_steps(c, 0.1)
  c.end_step = common.fraction_of_steps(c, 0.6)
  c.update_every = 100
  return c
