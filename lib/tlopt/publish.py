"""Tables and figures for a paper: what notebook 05 shows, also written under `<run>/tables/` and `<run>/figures/`.

Each table goes out as CSV (every digit) and LaTeX (three decimals), each figure as PNG and
SVG, all written atomically. An empty table is not shown as an empty frame: the notebook
says "none" instead, and no file is written.
"""

from __future__ import annotations

import os
from typing import Any

import pandas as pd
from IPython.display import Markdown
from matplotlib.figure import Figure

from tlopt.files import atomic_path, atomic_write_text, save_figure
from tlopt.store import RunFolder

NONE = "none"


def table(run: RunFolder | str | os.PathLike, name: str, frame: pd.DataFrame | None, digits: int = 3,
          empty: str = NONE) -> Any:
    """Write `tables/<name>.csv` and `.tex`; return what a notebook shows: the rounded table, or `empty` (Markdown)."""
    if frame is None or frame.empty:
        return Markdown(empty)
    run = RunFolder(run)
    with atomic_path(run.table_file(name, "csv"), suffix=".csv") as temporary:
        frame.to_csv(temporary)
    atomic_write_text(run.table_file(name, "tex"), frame.to_latex(float_format=f"%.{digits}f"))
    return frame.round(digits)


def figure(run: RunFolder | str | os.PathLike, name: str, plot: Figure) -> Figure:
    """Write `figures/<name>.png` and `.svg`; return the figure, for the notebook to show."""
    run = RunFolder(run)
    for suffix in ("png", "svg"):
        save_figure(plot, run.figure_file(name, suffix))
    return plot
