"""What several notebooks display, as one call each, so that a fix is made once."""

from __future__ import annotations

from IPython.display import Image, Markdown, display

from tlopt.params import Experiment
from tlopt.store import RunFolder
from tlopt.strategies import LAYER_STEP, get_strategy, strategy_runs

STEP_FIGURES = ("convergence.png", "acquisition.png")


def step_figures(config: Experiment, run: RunFolder, strategy: str, layers: bool = False) -> None:
    """Each step's convergence plot and, for 1-D and 2-D domains, its surrogate and acquisition.

    The model-optimization steps of `strategy`, or with `layers` its layer optimization,
    for every run of the strategy (one per backbone in per-backbone mode).
    """
    steps = (LAYER_STEP.name,) if layers else get_strategy(strategy).step_names
    for label, _ in strategy_runs(config, strategy):
        for step in steps:
            for figure in STEP_FIGURES:
                path = run.step_dir(label, step) / figure
                if path.is_file():
                    display(Markdown(f"**{label} / {step}: {figure}**"), Image(filename=path))
