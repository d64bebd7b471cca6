"""Train-step throughput of a CIFAR ResNet BNN here and in PyTorch, side by side (CPU), for STE
and STE-free StoMPP.

    pip install -r benchmarks/requirements-peer.txt      # torch, for this benchmark only
    python benchmarks/torch_peer.py --batch=128 --reps=5 --steps=3 [--xla_defaults] [--breakdown]
    python benchmarks/torch_peer.py --model=resnet18 --batch=64 --reps=3 --steps=1

The same network in both: the project's `resnet20` (or `resnet18`, CIFAR stem) in bnn mode
(configs/default.py rules: stem, shortcuts and classifier full precision; every other conv
binarizes its kernel and its input; no ReLU; BatchNorm momentum 0.9 (PyTorch 0.1), eps 1e-5), SGD 0.1 with momentum 0.9, the same batch
and shapes (B, 32, 32, 3) / NCHW, synthetic data, float32, one process using every CPU core.
- STE: kernels identity STE, inputs clipped STE; latent binary kernels clipped to [-1, 1] after
  each step.
- StoMPP: u' = sign(u) on frozen entries, clip(u, -1, 1) elsewhere; frozen entries pass no
  gradient and frozen kernel entries keep their value through the optimizer step. Both sides at
  step 400 of a 1000-step layerwise schedule (the fractions come from the project's schedule: about
  half the sites fully frozen, one freezing, the rest float). PyTorch, written the obvious way:
  per element scores drawn once, 1/100 of them re-drawn each step (soft refresh), mask =
  score < p, `torch.where` for the forward (autograd gives the gradient), and sites with p = 0 or 1
  skip the mask.
JAX runs the project's jitted `steps.train_step` (benchmarks/step_time.py builds it); PyTorch
runs eager mode (its default; no torch.compile). Repetitions interleave every bench so machine
noise hits all alike; each ratio printed is the median of per-repetition ratios.
--xla_defaults: also JAX compiled with XLA's default CPU options (STOMPP_JAX_CPU_COMPILER_OPTIONS=xla,
convolutions in YNNPACK), the step before stompp_jax/compiler.py's options, in the same run.

Where the time goes (`--breakdown`, same interleaving): the forward + backward of one 3x3 conv
of each stage's shape at the same batch, float32, jitted in JAX and eager in PyTorch (the conv
kernels alone), and the STE train step at batch 2 (the fixed per-step cost: dispatch, the
optimizer and the small ops).
"""

import contextlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import step_time  # noqa: E402  (benchmarks/step_time.py)
from torch_peer_args import MODELS, parse_args  # noqa: E402
from stompp_jax import compiler  # noqa: E402
from stompp_jax import experiment  # noqa: E402
from stompp_jax.binary import schedule  # noqa: E402


class _SignSTE(torch.autograd.Function):
  """sign (sign(0) = +1) with a straight-through gradient, clipped to |x| <= 1 or identity."""

  @staticmethod
  def forward(ctx, x, clipped):
    ctx.clipped = clipped
    if clipped:
      ctx.save_for_backward(x.abs() <= 1)
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

  @staticmethod
  def backward(ctx, grad):
    if ctx.clipped:
      (in_range,) = ctx.saved_tensors
      grad = grad * in_range
    return grad, None


def _ste_input(x):
  return _SignSTE.apply(x, True)


def _ste_kernel(w):
  return _SignSTE.apply(w, False)


class BinaryConv(nn.Conv2d):
  """3x3 conv, 'SAME' padding, binary kernel and input: STE by default (kernel identity STE,
  input clipped STE); `StoMPPSite` replaces the two binarizers."""

  def __init__(self, cin, cout, stride):
    super().__init__(cin, cout, 3, stride=stride, padding=0, bias=False)
    self.binarize_input, self.binarize_kernel = _ste_input, _ste_kernel

  def forward(self, x):
    x = self.binarize_input(x)
    # 'SAME' as XLA pads it: stride 2 pads (0, 1) on each spatial dim, stride 1 pads (1, 1).
    pad = (1, 1, 1, 1) if self.stride[0] == 1 else (0, 1, 0, 1)
    return self._conv_forward(nn.functional.pad(x, pad), self.binarize_kernel(self.weight), None)


def masked_sign(u, frozen, p):
  """sign(u) where frozen, clip(u, -1, 1) elsewhere; p = 0 or 1 needs no mask."""
  if p == 0:
    return u.clamp(-1, 1)
  signs = torch.where(u >= 0, 1.0, -1.0).to(u.dtype)
  return signs if p == 1 else torch.where(frozen, signs, u.clamp(-1, 1))


class StoMPPSite:
  """One binary conv's StoMPP state: frozen fraction p, per element scores of its kernel and of
  its input (shared by the batch), soft-refreshed each step."""

  def __init__(self, conv: BinaryConv, p: float, input_shape, refresh_every=100):
    self.conv, self.p, self.refresh = conv, p, 1.0 / refresh_every
    self.scores = {'kernel': torch.rand(conv.weight.shape), 'input': torch.rand(input_shape)}
    conv.binarize_kernel = lambda w: masked_sign(w, self.frozen['kernel'], self.p)
    conv.binarize_input = lambda x: masked_sign(x, self.frozen['input'], self.p)
    self.frozen = {}
    self.step()

  def step(self):
    """Re-draws about 1/refresh_every of the scores and recomputes the masks."""
    for name, scores in self.scores.items():
      if 0 < self.p < 1:
        redraw = torch.rand(scores.shape) < self.refresh
        self.scores[name] = torch.where(redraw, torch.rand(scores.shape), scores)
      self.frozen[name] = self.scores[name] < self.p


def _norm(channels):
  return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)


class Block(nn.Module):
  """The project's BasicBlock in bnn mode: no ReLU, projection shortcut where the shape changes."""

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1, self.bn1 = BinaryConv(cin, cout, stride), _norm(cout)
    self.conv2, self.bn2 = BinaryConv(cout, cout, 1), _norm(cout)
    self.shortcut = None
    if stride != 1 or cin != cout:
      self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), _norm(cout))

  def forward(self, x):
    y = self.bn2(self.conv2(self.bn1(self.conv1(x))))
    return y + (x if self.shortcut is None else self.shortcut(x))


class ResNetBNN(nn.Module):
  """Stem conv + BN (full precision, no ReLU), stages of basic blocks, pool, dense: the
  project's CIFAR ResNets (`MODELS`)."""

  def __init__(self, stage_channels, blocks_per_stage, num_classes=10):
    super().__init__()
    self.stem = nn.Sequential(nn.Conv2d(3, stage_channels[0], 3, padding=1, bias=False),
                              _norm(stage_channels[0]))
    blocks, cin = [], stage_channels[0]
    for stage, cout in enumerate(stage_channels):
      for b in range(blocks_per_stage):
        blocks.append(Block(cin, cout, 2 if stage > 0 and b == 0 else 1))
        cin = cout
    self.blocks = nn.Sequential(*blocks)
    self.classifier = nn.Linear(cin, num_classes)

  def forward(self, x):
    return self.classifier(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def site_fractions(model: str, method: str) -> list[float]:
  """The frozen fraction of each site of `model` at the JAX bench's step (the project's
  schedule)."""
  exp = experiment.build(step_time.make_config(model, method, 'float32'))
  step = int(step_time.START_FRACTION * step_time.TOTAL_STEPS)
  num_sites = len(exp.net.sites)
  return [float(schedule.frozen_fraction(step, i, num_sites, exp.binarization.schedule))
          for i in range(num_sites)]


class TorchBench:
  """The PyTorch train step (forward, backward, SGD momentum; STE: latent clip; StoMPP: masks
  and frozen kernel entries kept) on a fixed batch."""

  def __init__(self, batch_size, method='ste', model='resnet20', seed=0):
    torch.manual_seed(seed)
    self.model = ResNetBNN(*MODELS[model]).train()
    self.convs = [m for m in self.model.modules() if isinstance(m, BinaryConv)]
    self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
    rng = np.random.default_rng(seed)
    self.images = torch.from_numpy(rng.standard_normal((batch_size, 3, 32, 32), np.float32))
    self.labels = torch.from_numpy(rng.integers(0, 10, batch_size))
    self.loss_fn = nn.CrossEntropyLoss()
    self.sites = []
    if method == 'stompp':
      shapes = {}
      def record(module, inputs):  # Returns None: the inputs stay as they are.
        shapes[module] = inputs[0].shape[1:]
      hooks = [c.register_forward_pre_hook(record) for c in self.convs]
      self.model(self.images[:1])
      for hook in hooks:
        hook.remove()
      self.sites = [StoMPPSite(c, p, shapes[c]) for c, p in zip(self.convs, site_fractions(model, method))]

  def run(self, num_steps):
    start = time.perf_counter()
    for _ in range(num_steps):
      for site in self.sites:
        site.step()
      self.optimizer.zero_grad(set_to_none=True)
      loss = self.loss_fn(self.model(self.images), self.labels)
      loss.backward()
      before = [s.conv.weight.detach().clone() for s in self.sites if s.p > 0]
      self.optimizer.step()
      with torch.no_grad():
        if self.sites:
          for site, old in zip([s for s in self.sites if s.p > 0], before):
            site.conv.weight.copy_(torch.where(site.frozen['kernel'], old, site.conv.weight)
                                   if site.p < 1 else old)
        else:
          for conv in self.convs:
            conv.weight.clamp_(-1, 1)
    return (time.perf_counter() - start) / num_steps


class JaxConv:
  """Forward + backward of one 3x3 'SAME' conv (NHWC, HWIO), jitted: the conv kernels alone."""

  def __init__(self, batch, size, channels, seed=0):
    rng = np.random.default_rng(seed)
    self.x = jnp.asarray(rng.standard_normal((batch, size, size, channels), np.float32))
    self.w = jnp.asarray(rng.standard_normal((3, 3, channels, channels), np.float32))
    conv = lambda x, w: jnp.sum(jax.lax.conv_general_dilated(
        x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')) ** 2)
    self.grad = compiler.jit(jax.grad(conv, argnums=(0, 1)))
    jax.block_until_ready(self.grad(self.x, self.w))

  def run(self, num_steps):
    start = time.perf_counter()
    for _ in range(num_steps):
      out = self.grad(self.x, self.w)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / num_steps


class TorchConv:
  """The same conv in PyTorch (NCHW), eager."""

  def __init__(self, batch, size, channels, seed=0):
    rng = np.random.default_rng(seed)
    self.x = torch.from_numpy(rng.standard_normal((batch, channels, size, size), np.float32))
    self.w = torch.from_numpy(rng.standard_normal((channels, channels, 3, 3), np.float32))
    self.x.requires_grad_(True)
    self.w.requires_grad_(True)

  def run(self, num_steps):
    start = time.perf_counter()
    for _ in range(num_steps):
      self.x.grad = self.w.grad = None
      (nn.functional.conv2d(self.x, self.w, padding=1) ** 2).sum().backward()
    return (time.perf_counter() - start) / num_steps


def paired(benches, reps, steps):
  """{name: [seconds per step, one per repetition]}, every bench in each repetition, the order
  rotating between repetitions."""
  for bench in benches.values():
    bench.run(1)  # warm-up
  times = {name: [] for name in benches}
  names = list(benches)
  for rep in range(reps):
    for name in names[rep % len(names):] + names[:rep % len(names)]:
      times[name].append(benches[name].run(steps))
  return times


def ratio(times, a, b) -> float:
  """Median over repetitions of a's step time / b's."""
  return statistics.median(x / y for x, y in zip(times[a], times[b]))


def report(label, times, batch, a='jax', b='torch'):
  """One line: both img/s (medians) and the paired a / b time ratio."""
  a_ms, b_ms = (1e3 * statistics.median(times[n]) for n in (a, b))
  return (f'| {label} | {a_ms:.1f} | {b_ms:.1f} | {batch / a_ms * 1e3:.0f} |'
          f' {batch / b_ms * 1e3:.0f} | {ratio(times, a, b):.2f} |')


@contextlib.contextmanager
def xla_cpu_defaults():
  """Compiles inside run with XLA's default CPU options (not stompp_jax/compiler.py's)."""
  previous = os.environ.get(compiler.SETTING)
  os.environ[compiler.SETTING] = 'xla'
  try:
    yield
  finally:
    if previous is None:
      del os.environ[compiler.SETTING]
    else:
      os.environ[compiler.SETTING] = previous


def breakdown(args):
  """Markdown rows: each stage's 3x3 conv (forward + backward) and the step at batch 2."""
  rows = []
  for size, channels in ((32, 16), (16, 32), (8, 64)):
    times = paired({'jax': JaxConv(args.batch, size, channels),
                    'torch': TorchConv(args.batch, size, channels)}, args.reps, args.steps)
    rows.append(report(f'one 3x3 conv {size}x{size}x{channels}, fwd+bwd, batch {args.batch}',
                       times, args.batch))
  times = paired({'jax': step_time.Bench('resnet20', 'ste', 2, 'float32'),
                  'torch': TorchBench(2, 'ste')}, args.reps, args.steps)
  rows.append(report('train step, batch 2 (fixed cost)', times, 2))
  return rows


def main(argv=None):
  args = parse_args(argv, __doc__.split('\n\n')[0])
  torch.set_num_threads(os.cpu_count())
  print(f'{os.cpu_count()} CPUs, load average {os.getloadavg()}, torch {torch.__version__}'
        f' ({torch.get_num_threads()} threads), {args.model}, batch {args.batch}', flush=True)
  benches = {}
  for method in args.methods:
    benches[f'jax {method}'] = step_time.Bench(args.model, method, args.batch, 'float32')
    benches[f'torch {method}'] = TorchBench(args.batch, method, args.model)
    if args.xla_defaults:
      with xla_cpu_defaults():
        benches[f'jax {method} xla defaults'] = step_time.Bench(args.model, method, args.batch,
                                                                'float32')
  times = paired(benches, args.reps, args.steps)
  print('| bench | img/s (median) | median step ms | min | max | compile s |\n|---|---|---|---|---|---|')
  for name, t in times.items():
    compile_seconds = getattr(benches[name], 'compile_seconds', None)
    print(f'| {name} | {args.batch / statistics.median(t):.1f} | {1e3 * statistics.median(t):.0f} |'
          f' {1e3 * min(t):.0f} | {1e3 * max(t):.0f} |'
          f' {"-" if compile_seconds is None else f"{compile_seconds:.1f}"} |')
  for method in args.methods:
    print(f'{method}: jax / torch step time = {ratio(times, f"jax {method}", f"torch {method}"):.3f}'
          ' (paired median; > 1: JAX slower)', flush=True)
    if args.xla_defaults:
      print(f'{method}: jax with compiler.py options / with XLA defaults = '
            f'{ratio(times, f"jax {method}", f"jax {method} xla defaults"):.3f}', flush=True)
  if args.breakdown:
    print('| what | jax ms | torch ms | jax img/s | torch img/s | jax / torch (paired) |\n'
          '|---|---|---|---|---|---|')
    for row in breakdown(args):
      print(row, flush=True)
  print(f'load average after {os.getloadavg()}')


if __name__ == '__main__':
  main()
