"""The preflight table of docs/preflight.md, from the committed JSON beside this script.

    python benchmarks/preflight/table.py            # markdown on stdout
    python benchmarks/preflight/table.py --write    # into docs/preflight.md, between its markers

One row per (model, slice, method, per-chip batch): the train step's HBM per chip, fits or not,
the largest per-chip batch that fits (from the *_max_batch* files), FLOPs and bytes per step per
chip, the roofline images/s per chip, each ratio to the fp row of the same model, slice and
batch, and the compile times.
"""

import argparse
import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
DOC = os.path.join(HERE, '..', '..', 'docs', 'preflight.md')
BEGIN, END = '<!-- preflight table: begin -->', '<!-- preflight table: end -->'


def _rows() -> list[dict]:
  rows = []
  for path in sorted(glob.glob(os.path.join(HERE, '*.json'))):
    with open(path) as f:
      result = json.load(f)
    for method, figures in result.get('methods', {}).items():
      rows.append({'file': os.path.relpath(path, HERE), 'slice': result['topology'],
                   'model': figures['model'], 'method': method, 'result': result, **figures})
  return rows


def _key(row: dict) -> tuple:
  return (row['model'], row['slice'], row['per_chip_batch'], row['shard_params'],
          row['per_example_activation_masks'])


def _ratio(a, b) -> str:
  return f'{a / b:.3f}' if a is not None and b else '-'


def _variant(row: dict) -> str:
  """The row's method and how it differs from the default config on TPU."""
  return row['method'] + (' shard_params' if row['shard_params'] else '') + (
      ' per-example masks' if row['per_example_activation_masks'] else '') + (
      ' residuals packed' if row.get('residuals') == 'packed' else '') + (
      ' masks by cond' if row['method'].startswith('stompp') and row.get('masks_by') == 'cond'
      else '')


def table() -> str:
  rows = _rows()
  max_batch = {(r['model'], r['slice'], _variant(r)): r['max_batch']['max_per_chip_batch']
               for r in rows if 'max_batch' in r}
  fp = {_key(r): r for r in rows if r['method'] == 'fp' and 'train' in r['steps']
        and '_max_batch' not in r['file']}  # The max-batch jobs' rows are extras.
  lines = ['| model | slice | method | batch/chip | train HBM/chip GiB | fits | max batch/chip'
           ' | TFLOP/step/chip | GB/step/chip | roofline img/s/chip | HBM / fp | FLOPs / fp'
           ' | bytes / fp | compile s: train; eval, eval fully binary, recalibration | file |',
           '|' + '---|' * 15]
  for r in rows:
    train = r['steps'].get('train')
    if train is None or '_max_batch' in r['file']:  # Only their max batch.
      continue
    base = fp.get(_key(r), {}).get('steps', {}).get('train', {})
    fits = train['fits']
    hbm = train['hbm_bytes']['total'] if fits else None
    others = [s['compile_s'] for n, s in r['steps'].items() if n != 'train' and s.get('compile_s')]
    name = _variant(r)
    cells = [r['model'], r['slice'], name, str(r['per_chip_batch']),
             f'{hbm / 2**30:.2f}' if fits else '-',
             'yes' if fits else f'no ({train["message"]})',
             str(max_batch.get((r['model'], r['slice'], name), '-')),
             f'{train["flops"] / 1e12:.3f}' if fits else '-',
             f'{train["bytes_accessed"] / 1e9:.2f}' if fits else '-',
             f'{train["roofline"]["images_per_s_per_chip"]:.0f}' if fits else '-',
             _ratio(hbm, base.get('hbm_bytes', {}).get('total')) if fits else '-',
             _ratio(train.get('flops'), base.get('flops')),
             _ratio(train.get('bytes_accessed'), base.get('bytes_accessed')),
             f'{train["compile_s"]:.0f}; ' + ', '.join(f'{s:.0f}' for s in others),
             r['file']]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def write(doc: str = DOC) -> None:
  """Replaces the table between BEGIN and END in `doc`."""
  with open(doc) as f:
    text = f.read()
  head, rest = text.split(BEGIN)
  _, tail = rest.split(END)
  with open(doc, 'w') as f:
    f.write(f'{head}{BEGIN}\n{table()}\n{END}{tail}')


def parse_args(argv=None) -> argparse.Namespace:
  """The command line's arguments."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--write', action='store_true',
                      help='Rewrite the table of docs/preflight.md instead of printing it.')
  return parser.parse_args(argv)


if __name__ == '__main__':
  if parse_args().write:
    write()
  else:
    print(table())
