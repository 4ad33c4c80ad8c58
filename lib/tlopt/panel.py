"""The notebooks' ipywidgets panel: edit an experiment's bounds and budgets, save a new parameter file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tlopt.backbones import BACKBONES
from tlopt.errors import ConfigError
from tlopt.objectives import OBJECTIVES
from tlopt.params import THESIS_OPTIMIZERS, Experiment, dump_params, load_params
from tlopt.store import RunFolder

# The settings a researcher tunes most between experiments, as dotted keys of the schema.
PANEL_KEYS = (
    "run_name",
    "objective",
    "backbones",
    "optimizers",
    "learning_rate.min",
    "learning_rate.max",
    "learning_rate.scale",
    "bo.initial_points",
    "bo.iterations",
    "training.block_epochs",
    "training.finetune_epochs",
    "training.class_weight",
    "training.nonconvergence.enabled",
    "training.nonconvergence.threshold",
    "training.nonconvergence.patience",
)


class BoundsPanel:
    """Widgets over `PANEL_KEYS` of a parameter file; Save writes a new, validated file beside it.

    `params_file` is the file the notebook goes on with: the saved one after Save, the
    original before. Headless (`interactive=False`, as `tlopt run` executes the notebooks)
    no widget is created: the panel shows the file's values as a table and changes nothing.
    """

    def __init__(self, params_file: str | Path, interactive: bool = True, save_to: str | Path | None = None):
        self.source = Path(params_file)
        self.config = load_params(self.source)
        self.save_to = Path(save_to) if save_to else self.source.with_name(f"{self.source.stem}_edited.yaml")
        self.interactive = interactive
        self.saved_path: Path | None = None
        self.widgets: dict[str, Any] = self._make_widgets() if interactive else {}

    @property
    def params_file(self) -> Path:
        return self.saved_path or self.source

    def open(self, run_dir: str | Path | None = None) -> tuple[Experiment, RunFolder]:
        """The parameters the notebook goes on with (`params_file`), and their run folder (created or resumed)."""
        config = load_params(self.params_file)
        return config, RunFolder.open(config, run_dir)

    def _make_widgets(self) -> dict[str, Any]:
        import ipywidgets as w

        widgets = {
            "run_name": w.Text(),
            "objective": w.Dropdown(options=list(OBJECTIVES)),
            "backbones": w.SelectMultiple(options=list(BACKBONES), rows=8),
            "optimizers": w.SelectMultiple(options=list(THESIS_OPTIMIZERS), rows=7),
            "learning_rate.min": w.FloatText(),
            "learning_rate.max": w.FloatText(),
            "learning_rate.scale": w.Dropdown(options=["log", "linear"]),
            "bo.initial_points": w.BoundedIntText(min=1, max=1000),
            "bo.iterations": w.BoundedIntText(min=0, max=1000),
            "training.block_epochs": w.BoundedIntText(min=1, max=10000),
            "training.finetune_epochs": w.BoundedIntText(min=1, max=10000),
            "training.class_weight": w.Dropdown(options=["none", "balanced"]),
            "training.nonconvergence.enabled": w.Checkbox(),
            # A number, relative to chance ("chance+0.1"), or empty for the monitor's default.
            "training.nonconvergence.threshold": w.Text(placeholder="default"),
            "training.nonconvergence.patience": w.BoundedIntText(min=0, max=10000),
        }
        for key, widget in widgets.items():
            value = self.config.value(key)
            if isinstance(widget, w.Text) and not isinstance(value, str):
                value = "" if value is None else str(value)
            widget.value = tuple(value) if isinstance(value, list) else value
            widget.description = key
            widget.style = {"description_width": "initial"}
        return widgets

    def values(self) -> dict[str, Any]:
        """The panel's current values by dotted key (the file's values when headless)."""
        if not self.widgets:
            return {key: self.config.value(key) for key in PANEL_KEYS}
        values = {key: list(widget.value) if isinstance(widget.value, tuple) else widget.value
                  for key, widget in self.widgets.items()}
        values["training.nonconvergence.threshold"] = _threshold(values["training.nonconvergence.threshold"])
        return values

    def save(self) -> Path:
        """Validate the edited parameters and write them to `save_to`; ConfigError if invalid."""
        if not self.interactive:
            raise ConfigError("the panel is headless: it changes nothing")
        self.saved_path = dump_params(self.config.updated(self.values(), source="panel"), self.save_to)
        return self.saved_path

    def _on_save(self, status: Any) -> None:
        try:
            status.value = (f"Saved {self.save()} — the cells below use it (a new run_name needs "
                            f"00_data_split on it first; `tlopt run` runs it all)")
        except ConfigError as error:
            status.value = f"Not saved: {error}"

    def _ipython_display_(self) -> None:
        from IPython.display import display

        if not self.interactive:
            import pandas as pd

            display(pd.DataFrame({"value": [str(v) for v in self.values().values()]}, index=list(PANEL_KEYS)))
            return
        import ipywidgets as w

        status = w.Label()
        button = w.Button(description=f"Save to {self.save_to.name}", button_style="primary")
        button.on_click(lambda _: self._on_save(status))
        display(w.VBox([*self.widgets.values(), w.HBox([button, status])]))


def _threshold(text: str) -> float | str | None:
    """The threshold field: empty for the default, a number, or an expression relative to chance."""
    text = text.strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        return text


def bounds_panel(params_file: str | Path, interactive: bool = True, save_to: str | Path | None = None) -> BoundsPanel:
    """The notebooks' ipywidgets panel: edit bounds and budgets, save a new parameter file.

    `save_to` defaults to `<file>_edited.yaml` beside the parameter file.
    """
    return BoundsPanel(params_file, interactive, save_to)
