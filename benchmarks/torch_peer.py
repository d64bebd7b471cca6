"""Train-step throughput of the CIFAR ResNet-20 BNN (STE) here and in PyTorch, side by side (CPU).

    pip install -r benchmarks/requirements-peer.txt      # torch, for this benchmark only
    python benchmarks/torch_peer.py --batch=128 --reps=5 --steps=3 --breakdown

The same network in both: the project's `resnet20` in bnn mode (configs/default.py rules: stem,
shortcuts and classifier full precision; every other conv binarizes its kernel, identity STE,
and its input, clipped STE; no ReLU; BatchNorm momentum 0.9 (PyTorch 0.1), eps 1e-5), the STE
method's optimizer (SGD 0.1, momentum 0.9, latent binary kernels clipped to [-1, 1] after each
step), the same batch and shapes (B, 32, 32, 3) / NCHW, synthetic data, float32, one process
using every CPU core. JAX runs the project's jitted `steps.train_step` (benchmarks/step_time.py
builds it); PyTorch runs eager mode (its default; no torch.compile). Repetitions interleave the
two so machine noise hits both alike; the ratio printed is the median of per-repetition ratios.

Where the time goes (`--breakdown`, same interleaving): the forward + backward of one 3x3 conv
of each stage's shape at the same batch, float32, jitted in JAX and eager in PyTorch (the conv
kernels alone), and the whole train step at batch 2 (the fixed per-step cost: dispatch, the
optimizer and the small ops).
"""

import argparse
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
from stompp_jax import compiler  # noqa: E402


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


class BinaryConv(nn.Conv2d):
  """3x3 conv, 'SAME' padding, binary kernel (identity STE) and input (clipped STE)."""

  def __init__(self, cin, cout, stride):
    super().__init__(cin, cout, 3, stride=stride, padding=0, bias=False)

  def forward(self, x):
    x = _SignSTE.apply(x, True)
    # 'SAME' as XLA pads it: stride 2 pads (0, 1) on each spatial dim, stride 1 pads (1, 1).
    pad = (1, 1, 1, 1) if self.stride[0] == 1 else (0, 1, 0, 1)
    return self._conv_forward(nn.functional.pad(x, pad), _SignSTE.apply(self.weight, False), None)


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


class ResNet20BNN(nn.Module):
  """Stem conv + BN (full precision, no ReLU), 3 stages x 3 blocks of 16/32/64, pool, dense."""

  def __init__(self, num_classes=10):
    super().__init__()
    self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), _norm(16))
    blocks, cin = [], 16
    for stage, cout in enumerate((16, 32, 64)):
      for b in range(3):
        blocks.append(Block(cin, cout, 2 if stage > 0 and b == 0 else 1))
        cin = cout
    self.blocks = nn.Sequential(*blocks)
    self.classifier = nn.Linear(64, num_classes)

  def forward(self, x):
    return self.classifier(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class TorchBench:
  """The PyTorch train step (forward, backward, SGD momentum, latent clip) on a fixed batch."""

  def __init__(self, batch_size, seed=0):
    torch.manual_seed(seed)
    self.model = ResNet20BNN().train()
    self.binary = [m.weight for m in self.model.modules() if isinstance(m, BinaryConv)]
    self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
    rng = np.random.default_rng(seed)
    self.images = torch.from_numpy(rng.standard_normal((batch_size, 3, 32, 32), np.float32))
    self.labels = torch.from_numpy(rng.integers(0, 10, batch_size))
    self.loss_fn = nn.CrossEntropyLoss()

  def run(self, num_steps):
    start = time.perf_counter()
    for _ in range(num_steps):
      self.optimizer.zero_grad(set_to_none=True)
      loss = self.loss_fn(self.model(self.images), self.labels)
      loss.backward()
      self.optimizer.step()
      with torch.no_grad():
        for w in self.binary:
          w.clamp_(-1, 1)
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
  """{name: [seconds per step, one per repetition]}, the two benches interleaved."""
  for bench in benches.values():
    bench.run(1)  # warm-up
  times = {name: [] for name in benches}
  names = list(benches)
  for rep in range(reps):
    for name in (names if rep % 2 == 0 else names[::-1]):
      times[name].append(benches[name].run(steps))
  return times


def report(label, times, batch):
  """One line: both img/s (medians) and the paired jax / torch time ratio."""
  ratio = statistics.median(j / p for j, p in zip(times['jax'], times['torch']))
  jax_ms, torch_ms = (1e3 * statistics.median(times[n]) for n in ('jax', 'torch'))
  return (f'| {label} | {jax_ms:.1f} | {torch_ms:.1f} | {batch / jax_ms * 1e3:.0f} |'
          f' {batch / torch_ms * 1e3:.0f} | {ratio:.2f} |')


def breakdown(args):
  """Markdown rows: each stage's 3x3 conv (forward + backward) and the step at batch 2."""
  rows = []
  for size, channels in ((32, 16), (16, 32), (8, 64)):
    times = paired({'jax': JaxConv(args.batch, size, channels),
                    'torch': TorchConv(args.batch, size, channels)}, args.reps, args.steps)
    rows.append(report(f'one 3x3 conv {size}x{size}x{channels}, fwd+bwd, batch {args.batch}',
                       times, args.batch))
  times = paired({'jax': step_time.Bench('resnet20', 'ste', 2, 'float32'), 'torch': TorchBench(2)},
                 args.reps, args.steps)
  rows.append(report('train step, batch 2 (fixed cost)', times, 2))
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--reps', type=int, default=5)
  parser.add_argument('--steps', type=int, default=3, help='Consecutive steps per repetition.')
  parser.add_argument('--breakdown', action='store_true',
                      help='Also time one conv per stage and the step at batch 2.')
  args = parser.parse_args(argv)
  torch.set_num_threads(os.cpu_count())
  print(f'{os.cpu_count()} CPUs, load average {os.getloadavg()}, torch {torch.__version__}'
        f' ({torch.get_num_threads()} threads), batch {args.batch}', flush=True)
  benches = {'jax': step_time.Bench('resnet20', 'ste', args.batch, 'float32'),
             'torch': TorchBench(args.batch)}
  times = paired(benches, args.reps, args.steps)
  for name, t in times.items():
    print(f'{name:>5}: {args.batch / statistics.median(t):7.1f} img/s (median step'
          f' {1e3 * statistics.median(t):.0f} ms, min {1e3 * min(t):.0f}, max {1e3 * max(t):.0f})')
  ratio = statistics.median(j / p for j, p in zip(times['jax'], times['torch']))
  print(f'jax / torch step time = {ratio:.3f} (paired median; > 1: JAX slower); jax compile'
        f' {benches["jax"].compile_seconds:.1f} s', flush=True)
  if args.breakdown:
    print('| what | jax ms | torch ms | jax img/s | torch img/s | jax / torch (paired) |\n'
          '|---|---|---|---|---|---|\n' + report(f'train step, batch {args.batch}', times, args.batch))
    for row in breakdown(args):
      print(row, flush=True)
  print(f'load average after {os.getloadavg()}')


if __name__ == '__main__':
  main()
