"""Export of the deployed fully binary network (every mask = 1): packed bits, folded BatchNorm.

    python -m stompp_jax.export --workdir=RUN --out=DIR      # __main__.py; docs/export.md

  sources.py    what is exported: a run's newest checkpoint, a config's initialized model
  program.py    the program (ops over named values) from the model's one abstract trace
  fold.py       bit packing and BatchNorm folding (BatchNorm + sign -> integer thresholds)
  files.py      manifest.json + tensors.npz: writing, reading, the size report
  inference.py  reference inference of an export in JAX (XNOR-popcount for binary layers)
  portable.py   model.jax_export: the fully binary inference as a jax.export artefact (any model)

Imports run one way: sources -> program -> fold; sources -> files -> fold; inference -> files,
fold. inference.py imports no model code and no Flax.
"""
