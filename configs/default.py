"""Every configurable field of stompp_jax, with its default and meaning.

Other configs start from `get_config()` here and change fields; a field that is not
defined here is an error (the ConfigDict is locked). docs/configuration.md is generated from
this file's comments (python docs/make_configuration_md.py).

    python -m stompp_jax.main --config=configs/default.py --workdir=/tmp/run

trains a CIFAR ResNet-20 BNN with StoMPP on CIFAR-10 for 100 epochs, downloading the CIFAR-10
archive into ~/stompp_data when it is missing (configs/quickstart.py is a short CPU run). Any
field can be overridden: `--config.binary.method=ste`.
"""

import ml_collections


def get_config(arg=None):
  """Returns the default ConfigDict. `arg` is accepted for a uniform interface."""
  del arg
  c = ml_collections.ConfigDict()

  c.seed = 0  # One seed for init, masks and data order; per-step keys fold in the step.

  # ---------------------------------------------------------------- model
  c.model = ml_collections.ConfigDict()
  # resnet18 | resnet34 | resnet50 | resnet20 | resnet32 | resnet44 | resnet56 | resnet110 |
  # bireal18 (Bi-Real Net, models/bireal.py) | mobilenet_v2 | tiny_resnet (a tiny model for tests).
  c.model.name = 'resnet20'
  c.model.stem = 'auto'  # auto (from dataset image size) | cifar | imagenet.
  c.model.mode = 'bnn'  # fp | bwn (binary kernels) | bnn (binary kernels and inputs).
  c.model.width_multiplier = 1.0  # MobileNetV2 width.
  # BNN block topology (models/resnet.py; docs/concepts.md, "the two block readings"): real
  # (the shortcut carries the real block input) | binarized (the block input is binarized once,
  # by conv1's site, for conv1 and the shortcut). ResNets only (mobilenet_v2: real). Default
  # real [ours]: it trained the more accurate network for every method, by 1.3-3.2 points at
  # ResNet-20 and 15-17 at ResNet-56 (docs/results.md); binarized is the reading in which a
  # committed binary activation cuts the gradient upstream.
  c.model.bnn_shortcut = 'real'
  # Regexes on module paths ('/'-joined, e.g. 'stage2_block1/conv1'). A conv/dense layer is
  # binary iff it matches a `binary_include` rule and no `binary_exclude` rule.
  # Default [ours, after 2606.27759]: stem, classifier and downsampling shortcuts stay float.
  c.model.binary_include = ('.*',)
  c.model.binary_exclude = ('^stem', '^classifier', 'shortcut')  # Float layers (see above).
  c.model.dtype = 'float32'  # Compute dtype: float32 | bfloat16 (params and BN stats stay f32).
  # Recorded by the trainer, not set: '' (a zoo model), or 'package.module.Class' of the model
  # of your own that train_and_evaluate(..., model=...) trained (docs/own-model.md).
  c.model.own_class = ''

  # ---------------------------------------------------------------- binarization (docs/method.md)
  c.binary = ml_collections.ConfigDict()
  c.binary.method = 'stompp'  # fp | ste | stompp | stompp_ste.
  # StoMPP+STE surrogate on frozen entries: ste_clipped [ours, default] | ste_identity.
  c.binary.frozen_grad = 'ste_clipped'
  # Zero the optimizer update of frozen kernel entries. None = method default
  # (on for stompp, off for stompp_ste) [ours].
  c.binary.mask_frozen_updates = ml_collections.config_dict.placeholder(bool)
  # Clip latent kernels to [-1, 1] after each step. None = method default (on for ste) [ours].
  c.binary.clip_latent = ml_collections.config_dict.placeholder(bool)
  c.binary.order = 'layerwise'  # layerwise | global | reverse.
  # cubic [2606.27759] | linear | quadratic | cosine | flipped_quadratic.
  c.binary.shape = 'cubic'
  c.binary.span_start = 0.0  # Progression starts at this fraction of training [ours].
  c.binary.span_end = 0.8  # Progression ends at this fraction; fully binary afterwards [ours].
  c.binary.window_overlap = 0.0  # Layerwise windows overlap by this fraction of a window [ours].
  # Steps per layerwise window (> 0): the span starts at span_start and lasts as many windows
  # as the model has sites, whatever the depth (span_end unused); 0 = windows from the span.
  c.binary.window_steps = 0
  c.binary.refresh_every = 100  # Soft refresh period r in steps (2606.27759); 0 = never.
  # One activation mask per example; False: one mask shared by the batch [ours].
  c.binary.per_example_activation_masks = False
  # How masks are made; the same values either way (docs/performance.md): cond (a per-site
  # branch skips hashing at p = 0 or 1) | select (every site hashes, no branch) | auto (cond on
  # CPU, select on TPU and GPU).
  c.binary.masks_by = 'auto'
  # Storage of the kernel masks and binarizer residuals a train step keeps: auto (packed on
  # CPU, bool on TPU and GPU) | packed (eight to a byte) | bool.
  c.binary.residuals = 'auto'
  # A StoMPP site at p = 1 (its binarizers pass no gradient): skip its conv's weight and input
  # gradients | full (compute them as XLA does) | auto (skip on CPU, full on TPU and GPU).
  c.binary.committed_backward = 'auto'

  # ---------------------------------------------------------------- data
  c.data = ml_collections.ConfigDict()
  c.data.name = 'cifar10'  # cifar10 | cifar100 | imagenet2012 | digits (built in, npz).
  # tfds (array_record via tfds.data_source) | cifar_archive (the original archives) |
  # npz (train.npz/test.npz with image, label) | synthetic | auto (tfds when data.dir holds
  # the dataset prepared by tfds, else cifar_archive; the CIFAR family configs use it).
  c.data.source = 'cifar_archive'
  # Local data directory (for tfds, its data_dir; a bucket through its gcsfuse mount, e.g.
  # /mnt/stompp_data/tensorflow_datasets: docs/data.md); '' = $STOMPP_DATA_DIR, else ~/stompp_data.
  c.data.dir = ''
  c.data.download = True  # cifar_archive: download the official archive if it is missing.
  c.data.cifar100_labels = 'fine'  # fine | coarse.
  c.data.augment = 'auto'  # auto (from dataset) | cifar | imagenet | none.
  c.data.image_size = 0  # Train/eval crop size; 0 = dataset default (32 or 224).
  c.data.num_workers = 0  # grain worker processes for decoding/augmenting; 0 = in-process.
  c.data.prefetch = 2  # Batches prefetched ahead of the train step.
  # synthetic source only: random images whose class sets their mean (learnable), standing in
  # for data.name; 0 classes / shape () = those of data.name (224x224x3 for imagenet2012).
  c.data.synthetic_num_classes = 0
  c.data.synthetic_image_shape = ()  # synthetic source only: (H, W, C), () = see above.
  c.data.synthetic_train_size = 1024  # synthetic source only.
  c.data.synthetic_eval_size = 256  # synthetic source only.

  # ---------------------------------------------------------------- optimization
  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'sgd'  # sgd | adam | adamw.
  c.optim.learning_rate = 0.1  # Peak learning rate (2606.27759: constant 0.1).
  c.optim.schedule = 'constant'  # constant | cosine | warmup_cosine | warmup_constant.
  c.optim.warmup_epochs = 0.0  # Linear warmup length of the warmup_* schedules.
  c.optim.momentum = 0.9  # sgd only.
  c.optim.nesterov = False  # sgd only.
  c.optim.b1 = 0.9  # adam/adamw.
  c.optim.b2 = 0.999  # adam/adamw.
  c.optim.weight_decay = 0.0  # On kernels only (never BN or biases). 2606.27759: none.
  c.optim.grad_clip_norm = 0.0  # Global-norm clipping; 0 = off.

  # ---------------------------------------------------------------- training loop
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 256  # Global batch over all processes (2606.27759: 256).
  c.train.eval_batch_size = 512  # Global eval batch.
  c.train.num_epochs = 100.0  # Used when num_steps is 0.
  c.train.num_steps = 0  # > 0 overrides num_epochs.
  c.train.log_every = 50  # Steps between train-metric rows.
  c.train.eval_every = 1000  # Steps between evaluations (and at the end); 0 = only at the end.
  # Eval on eval_steps batches of examples spread over the split (0 = the whole split).
  c.train.eval_steps = 0
  # Before each eval, re-estimate the fully binary network's BatchNorm statistics on this many
  # training batches (an average of per-batch statistics; the state is not changed) and log
  # eval_fully_binary_recalibrated_loss/_accuracy too. 0 = off; binary methods only.
  c.train.recalibrate_bn_batches = 0
  c.train.checkpoint_every = 1000  # Steps between checkpoints (and at the end).
  c.train.keep_checkpoints = 3  # Newest checkpoints kept; older ones are deleted.
  c.train.on_nonfinite = 'error'  # error: stop naming the step | skip: drop that update.
  c.train.diagnostics = False  # Per-site sign flips, in-clip fraction, gradient norms.
  c.train.override_workdir_config = False  # Allow resuming a workdir made with another config.

  # ---------------------------------------------------------------- distribution
  c.mesh = ml_collections.ConfigDict()
  c.mesh.num_devices = 0  # Devices in the mesh; 0 = all devices of all processes.
  c.mesh.shard_params = False  # FSDP-style: shard params/opt state over the data axis.

  c.lock()
  return c
