"""ResNet-50 on ImageNet with RigL: the ImageNet recipe of the RigL paper (1x).

- Model: ResNet-50 (He et al., 2016, "Deep Residual Learning for Image
  Recognition"), stride on the 3x3 convolutions, 25.6M parameters.
- Data: ImageNet-2012 (Russakovsky et al., 2015) as TFDS `imagenet2012` in
  array_record; random-resized crop (8%-100% area, ratio 3/4-4/3) and flip for
  training, resize to 256 and 224 centre crop for evaluation.
- Recipe: Evci et al. (2020), "Rigging the Lottery: Making All Tickets Winners",
  ICML: batch 4096, 32,000 steps (~100 epochs, "1x"; multiply `steps` for 2x, 5x:
  the schedule follows), SGD with Nesterov momentum 0.9, label smoothing 0.1, weight
  decay 1e-4, lr 0.1 x 4096 / 256 = 1.6 warmed up linearly over 5 epochs and
  divided by 10 at epochs 30, 70 and 90 (Goyal et al., 2017, "Accurate, Large
  Minibatch SGD"; `--config.lr_schedule=cosine` for cosine decay); RigL at 80%
  sparsity with ERK, mask updates every 100 steps, drop fraction 0.3, until step
  25,000 of 32,000. As in the paper the first convolution stays dense: `include`
  selects every kernel but the stem's (a regex searched in parameter paths;
  `--config.include=kernel` prunes the stem too).
- Scale: meant for accelerators (bfloat16 compute); set `--config.distributed=True`
  on multi-host pods (the batch is split evenly between hosts).
"""

from experiments.configs import common

NUM_TRAIN = 1_281_167
BATCH = 4096
STEPS = 32_000
STEPS_PER_EPOCH = NUM_TRAIN / BATCH  # ~312.8
# All kernels except the first convolution's ("stem_conv/kernel", with or without a
# leading "params/").
KERNELS_BUT_STEM = r"^(?!(.*/)?stem_conv/).*kernel$"


def get_config():
  c = common.base_config("imagenet_resnet50")
  c.dataset = "imagenet2012"
  c.num_classes = 1000
  c.image_size = 224
  c.model = "resnet50"
  c.model_kwargs.num_filters = 64
  c.model_kwargs.zero_init_residual = False
  c.dtype = "bfloat16"

  c.batch_size = BATCH
  c.eval_batch_size = 1024
  c.steps = STEPS
  c.optimizer = "sgd"
  c.momentum = 0.9
  c.nesterov = True
  c.learning_rate = 0.1 * BATCH / 256
  c.warmup_steps = round(5 * STEPS_PER_EPOCH)
  c.lr_schedule = "step"
  c.lr_decay_boundaries = tuple(e * STEPS_PER_EPOCH / STEPS for e in (30, 70, 90))
  c.lr_decay_factor = 0.1
  c.weight_decay = 1e-4
  c.label_smoothing = 0.1

  c.eval_every = 2_000  # log_every, checkpoint_every: base_config's

  common.use_rigl(c, sparsity=0.8, end_fraction=25_000 / STEPS)
  c.include = KERNELS_BUT_STEM
  return c
