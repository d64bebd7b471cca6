"""Plain-text tables for the reports (site table, model summary, export size). No imports."""


def table(rows: list[tuple[str, ...]], left: int) -> list[str]:
  """Rows as lines of columns; the first `left` columns left-aligned, the others right-aligned."""
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  return ['  '.join(c.ljust(w) if i < left else c.rjust(w)
                    for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
