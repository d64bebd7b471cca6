"""Named sweeps: the experiments behind the published tables of docs/method.md.

A grid is a config file with axes; every combination of axis values is one run. `args` axes are
config arguments (`configs/cifar.py:dataset=cifar10,model=resnet50,...`), `overrides` axes are
`--config.KEY=VALUE` flags; an axis with one value fixes it. Every grid runs seeds 0, 1 and 2.
Each doc gives the published top-1 (%) that the grid's rows are to be compared with.
"""

import dataclasses
from typing import Any, Mapping, Sequence

Axes = Mapping[str, Sequence[Any]]


@dataclasses.dataclass(frozen=True)
class Grid:
  doc: str  # What the grid measures and the published numbers.
  config: str  # Config file, relative to the repository root.
  args: Axes = dataclasses.field(default_factory=dict)  # Config-argument axes.
  overrides: Axes = dataclasses.field(default_factory=dict)  # --config.KEY axes.


CIFAR = 'configs/cifar.py'
IMAGENET = 'configs/imagenet.py'
SEEDS = {'seed': (0, 1, 2)}
# The setting of the ablation tables (order, learning rate): ResNet-18 BNN on CIFAR-100.
R18_BNN_CIFAR100 = {'dataset': ('cifar100',), 'model': ('resnet18',), 'mode': ('bnn',)}

GRIDS = {
    'r50_bnn_cifar': Grid(
        'ResNet-50 BNN, CIFAR-10 / CIFAR-100 (2606.27759): STE 51.5 / 26.7, '
        'StoMPP 69.5 / 40.2, StoMPP+STE 78.6 / 46.5.',
        CIFAR,
        args={'dataset': ('cifar10', 'cifar100'), 'model': ('resnet50',), 'mode': ('bnn',),
              'method': ('ste', 'stompp', 'stompp_ste')},
        overrides=SEEDS),
    'r50_bnn_imagenet': Grid(
        'ResNet-50 BNN, ImageNet (2606.27759): STE 30.8, StoMPP +3.8 over STE, StoMPP+STE 48.5.',
        IMAGENET,
        args={'model': ('resnet50',), 'mode': ('bnn',), 'method': ('ste', 'stompp', 'stompp_ste')},
        overrides=SEEDS),
    'r18_bnn_cifar': Grid(
        'ResNet-18 BNN, StoMPP over STE (2601.22660): +3.1 on CIFAR-10, +4.7 on CIFAR-100.',
        CIFAR,
        args={'dataset': ('cifar10', 'cifar100'), 'model': ('resnet18',), 'mode': ('bnn',),
              'method': ('ste', 'stompp')},
        overrides=SEEDS),
    'r18_bnn_imagenet': Grid(
        'ResNet-18 BNN, ImageNet, StoMPP over STE (2601.22660): +1.3.',
        IMAGENET,
        args={'model': ('resnet18',), 'mode': ('bnn',), 'method': ('ste', 'stompp')},
        overrides=SEEDS),
    'order_ablation': Grid(
        'Freezing order, BNN CIFAR-100, STE-free (2606.27759): layerwise / global / reverse '
        '53.8 / 53.2 / 28.4 (ResNet-18), 40.0 / 35.9 / 8.6 (ResNet-50).',
        CIFAR,
        args={'dataset': ('cifar100',), 'model': ('resnet18', 'resnet50'), 'mode': ('bnn',),
              'method': ('stompp',), 'order': ('layerwise', 'global', 'reverse')},
        overrides=SEEDS),
    'lr_ablation': Grid(
        'Learning rate 0.1 / 0.05, ResNet-18 BNN CIFAR-100: STE 48.9 / 46.8, '
        'StoMPP 53.8 / 54.2.',
        CIFAR,
        args={**R18_BNN_CIFAR100, 'method': ('ste', 'stompp')},
        overrides={'optim.learning_rate': (0.1, 0.05), **SEEDS}),
    'schedule_shapes': Grid(
        'Schedule shapes, reported comparable (2606.27759; cubic is the default), on '
        'ResNet-18 BNN CIFAR-100 StoMPP [ours].',
        CIFAR,
        args={**R18_BNN_CIFAR100, 'method': ('stompp',),
              'shape': ('cubic', 'linear', 'quadratic', 'cosine', 'flipped_quadratic')},
        overrides=SEEDS),
    'refresh_rates': Grid(
        'Soft refresh period r: 100 reported, robust for 10..1000 (2606.27759); 0 = never; on '
        'ResNet-18 BNN CIFAR-100 StoMPP [ours].',
        CIFAR,
        args={**R18_BNN_CIFAR100, 'method': ('stompp',), 'refresh': ('0', '10', '100', '1000')},
        overrides=SEEDS),
    'bwn_vs_bnn': Grid(
        'ResNet-50 StoMPP, CIFAR-10 / CIFAR-100: BWN 91.2 / 69.5 (2601.22660), '
        'BNN 69.5 / 40.2 (2606.27759).',
        CIFAR,
        args={'dataset': ('cifar10', 'cifar100'), 'model': ('resnet50',), 'mode': ('bwn', 'bnn'),
              'method': ('stompp',)},
        overrides=SEEDS),
    'mobilenet_v2': Grid(
        'MobileNetV2 CIFAR-100 (2606.27759): STE 40.5, StoMPP+STE 48.0; BNN [ours].',
        CIFAR,
        args={'dataset': ('cifar100',), 'model': ('mobilenet_v2',), 'mode': ('bnn',),
              'method': ('ste', 'stompp_ste')},
        overrides=SEEDS),
}
