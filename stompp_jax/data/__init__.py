"""Input data: sources (tfds, CIFAR archives, npz, synthetic) and grain pipelines.

The training loop uses `dataset_info`, `make_train_iterator` and `make_eval_iterator`;
see docs/data.md for the sources and how to prepare them.
"""

from stompp_jax.data.pipeline import DatasetInfo
from stompp_jax.data.pipeline import dataset_info
from stompp_jax.data.pipeline import make_eval_iterator
from stompp_jax.data.pipeline import make_train_iterator
