"""The experiment's parameter file: load, fill defaults, validate, resolve paths.

One YAML file describes an experiment (../shared/DESIGN.md). Validation is
pydantic's; every error is turned into one line that names the file, the
dotted key and the offending value, because a traceback helps nobody who
mistyped a key.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tlopt.errors import ConfigError

THESIS_OPTIMIZERS = ("Nadam", "SGD", "RMSprop", "Adagrad", "Adam", "Adamax", "Adadelta")
STRATEGY_NAMES = ("shared", "separate_hyperparameters", "separate_optimizations", "joint")


class _Section(BaseModel):
    """Unknown keys are errors; types are checked strictly (an int is a valid float)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class DemoData(_Section):
    """Generate the embedded demo dataset into `data.root` before discovering it."""

    images_per_class: int = Field(50, ge=4)
    image_size: int = Field(96, ge=32)
    num_classes: int = Field(4, ge=2, le=8)


class Data(_Section):
    root: str
    image_size: int = Field(299, ge=32)
    batch_size: int = Field(16, ge=1)
    val_fraction: float = Field(0.3, gt=0, lt=1)
    test_fraction: float = Field(0.0, ge=0, lt=1)
    group_pattern: str | None = None
    on_bad_image: Literal["skip", "error"] = "skip"
    image_cache: bool = True
    demo: DemoData | None = None

    @model_validator(mode="after")
    def _check(self) -> "Data":
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction + test_fraction must be below 1 "
                f"(got {self.val_fraction} + {self.test_fraction})"
            )
        if self.group_pattern is not None:
            try:
                compiled = re.compile(self.group_pattern)
            except re.error as error:
                raise ValueError(f"group_pattern {self.group_pattern!r} is not a regex: {error}")
            if compiled.groups < 1:
                raise ValueError(f"group_pattern {self.group_pattern!r} needs a capture group")
        return self


class LearningRate(_Section):
    min: float = Field(1e-4, gt=0)
    max: float = Field(1.0, gt=0)
    scale: Literal["linear", "log"] = "log"

    @model_validator(mode="after")
    def _check(self) -> "LearningRate":
        if self.min >= self.max:
            raise ValueError(f"min must be below max (got min={self.min}, max={self.max})")
        return self


class Nonconvergence(_Section):
    enabled: bool = True
    monitor: str = "val_accuracy"
    threshold: float = 0.5
    patience: int = Field(5, ge=0)
    mode: Literal["auto", "min", "max"] = "auto"


class Training(_Section):
    block_epochs: int = Field(10, ge=1)
    finetune_epochs: int = Field(50, ge=1)
    early_stopping_patience: int = Field(5, ge=1)
    nonconvergence: Nonconvergence = Nonconvergence()
    default_delimiting_fraction: float = Field(2 / 3, ge=0, le=1)
    feature_cache: bool = True
    mixed_precision: bool = False
    jit_compile: bool = False


class BayesianOptimization(_Section):
    method: Literal["bayesian", "random"] = "bayesian"
    initial_points: int = Field(5, ge=1)
    iterations: int = Field(10, ge=0)
    eps: float = Field(1e-8, ge=0)
    acquisition: Literal["EI", "MPI", "LCB"] = "EI"
    encoding: Literal["categorical", "index"] = "categorical"
    per_backbone: bool = False
    max_consecutive_failures: int = Field(3, ge=1)


class LayerOptimization(_Section):
    enabled: bool = True
    delimiting: Literal["index", "fraction"] = "index"


class Experiment(_Section):
    run_name: str = Field("experiment", pattern=r"^[A-Za-z0-9_.-]+$")
    results_dir: str = "results"
    seed: int = 0
    data: Data
    backbones: list[str] = Field(
        default_factory=lambda: [
            "Xception", "VGG16", "VGG19", "ResNet50", "InceptionV3",
            "InceptionResNetV2", "DenseNet121", "DenseNet169", "DenseNet201",
        ],
        min_length=1,
    )
    weights: str | None = "imagenet"
    pooling: Literal["max", "avg"] = "max"
    optimizers: list[str] = Field(default_factory=lambda: list(THESIS_OPTIMIZERS), min_length=1)
    learning_rate: LearningRate = LearningRate()
    training: Training = Training()
    bo: BayesianOptimization = BayesianOptimization()
    strategies: list[Literal[STRATEGY_NAMES]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["shared", "separate_hyperparameters", "separate_optimizations"],
        min_length=1,
    )
    layer_optimization: LayerOptimization = LayerOptimization()


def _float_aware_loader() -> type[yaml.SafeLoader]:
    """PyYAML reads `1e-4` as a string (YAML 1.1); researchers write learning rates that way."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(
            r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
            |\.[0-9_]+(?:[eE][-+][0-9]+)?
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
            re.X,
        ),
        list("-+0123456789."),
    )
    return Loader


def _describe(error: ValidationError, raw: dict, source: str) -> str:
    """The first pydantic error as one line: file, dotted key, message, value."""
    first = error.errors()[0]
    location = [str(part) for part in first["loc"] if not str(part).startswith("function-")]
    key = ".".join(location) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'"
    if first["type"] == "missing":
        return f"{source}: missing key '{key}'"
    message = first["msg"].removeprefix("Value error, ")
    if "input" in first and first["type"] not in ("value_error", "assertion_error"):
        message += f" (got {first['input']!r})"
    return f"{source}: {key}: {message}"


def _check_names(params: dict, source: str) -> None:
    """Backbone and optimizer names, and the image size each backbone needs."""
    from tlopt.backbones import BACKBONES

    for name in params["backbones"]:
        if name not in BACKBONES:
            raise ConfigError(
                f"{source}: backbones: unknown backbone '{name}' (known: {', '.join(BACKBONES)})"
            )
        minimum = BACKBONES[name].min_input_size
        if params["data"]["image_size"] < minimum:
            raise ConfigError(
                f"{source}: data.image_size: {params['data']['image_size']} px is below "
                f"{name}'s minimum of {minimum} px"
            )
    for name in params["optimizers"]:
        if name not in THESIS_OPTIMIZERS:
            raise ConfigError(
                f"{source}: optimizers: unknown optimizer '{name}' "
                f"(known: {', '.join(THESIS_OPTIMIZERS)})"
            )
    for key in ("backbones", "optimizers", "strategies"):
        if len(set(params[key])) != len(params[key]):
            raise ConfigError(f"{source}: {key}: names must not repeat (got {params[key]})")


def _resolve_paths(params: dict, base: Path) -> None:
    """Relative paths in the file are relative to the file's own folder."""
    params["data"]["root"] = str((base / params["data"]["root"]).resolve())
    params["results_dir"] = str((base / params["results_dir"]).resolve())
    weights = params["weights"]
    if weights not in (None, "imagenet"):
        path = (base / weights).resolve()
        if not path.is_file():
            raise ConfigError(f"weights: file not found: {path}")
        params["weights"] = str(path)


def _apply_overrides(raw: dict, overrides: dict[str, Any]) -> None:
    """Dotted keys (`training.nonconvergence.enabled`) set values before validation."""
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted}: '{part}' is not a section")
        node[leaf] = value


def validate(raw: dict, source: str = "parameters", base: Path | None = None) -> dict:
    """Validate a raw mapping, fill every default, resolve paths; return a plain dict."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of keys, got {type(raw).__name__}")
    try:
        params = Experiment.model_validate(raw).model_dump()
    except ValidationError as error:
        raise ConfigError(_describe(error, raw, source)) from None
    _check_names(params, source)
    if base is not None:
        _resolve_paths(params, base)
    return params


def load_params(path: str | Path, overrides: dict[str, Any] | None = None) -> dict:
    """Load a parameter file; `overrides` are dotted keys applied before validation."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"parameter file not found: {path}")
    try:
        raw = yaml.load(path.read_text(), Loader=_float_aware_loader()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    raw = copy.deepcopy(raw)
    if overrides:
        _apply_overrides(raw, overrides)
    return validate(raw, source=str(path), base=path.parent)


def dump_params(params: dict, path: str | Path) -> Path:
    """Write parameters as YAML atomically (the resolved copy kept in a run folder)."""
    from tlopt.store import atomic_write_text

    return atomic_write_text(Path(path), yaml.safe_dump(params, sort_keys=False))



# The settings a researcher tunes most between experiments, as dotted keys of the schema.
PANEL_KEYS = (
    "run_name",
    "backbones",
    "optimizers",
    "learning_rate.min",
    "learning_rate.max",
    "learning_rate.scale",
    "bo.initial_points",
    "bo.iterations",
    "training.block_epochs",
    "training.finetune_epochs",
    "training.nonconvergence.enabled",
    "training.nonconvergence.threshold",
    "training.nonconvergence.patience",
)


def _get(params: dict, dotted: str) -> Any:
    value = params
    for part in dotted.split("."):
        value = value[part]
    return value


class BoundsPanel:
    """Widgets over `PANEL_KEYS` of a parameter file; Save writes a new, validated file beside it.

    `params_file` is the file the notebook goes on with: the saved one after Save, the
    original before. Headless (`interactive=False`, as `tlopt run` executes the notebooks)
    no widget is created: the panel shows the file's values as a table and changes nothing.
    """

    def __init__(self, params_file: str | Path, interactive: bool = True, save_to: str | Path | None = None):
        self.source = Path(params_file)
        self.params = load_params(self.source)
        self.save_to = Path(save_to) if save_to else self.source.with_name(f"{self.source.stem}_edited.yaml")
        self.interactive = interactive
        self.saved_path: Path | None = None
        self.widgets: dict[str, Any] = self._make_widgets() if interactive else {}

    @property
    def params_file(self) -> Path:
        return self.saved_path or self.source

    def _make_widgets(self) -> dict[str, Any]:
        import ipywidgets as w

        from tlopt.backbones import BACKBONES

        widgets = {
            "run_name": w.Text(),
            "backbones": w.SelectMultiple(options=list(BACKBONES), rows=8),
            "optimizers": w.SelectMultiple(options=list(THESIS_OPTIMIZERS), rows=7),
            "learning_rate.min": w.FloatText(),
            "learning_rate.max": w.FloatText(),
            "learning_rate.scale": w.Dropdown(options=["log", "linear"]),
            "bo.initial_points": w.BoundedIntText(min=1, max=1000),
            "bo.iterations": w.BoundedIntText(min=0, max=1000),
            "training.block_epochs": w.BoundedIntText(min=1, max=10000),
            "training.finetune_epochs": w.BoundedIntText(min=1, max=10000),
            "training.nonconvergence.enabled": w.Checkbox(),
            "training.nonconvergence.threshold": w.FloatText(),
            "training.nonconvergence.patience": w.BoundedIntText(min=0, max=10000),
        }
        for key, widget in widgets.items():
            value = _get(self.params, key)
            widget.value = tuple(value) if isinstance(value, list) else value
            widget.description = key
            widget.style = {"description_width": "initial"}
        return widgets

    def values(self) -> dict[str, Any]:
        """The panel's current values by dotted key (the file's values when headless)."""
        if not self.widgets:
            return {key: _get(self.params, key) for key in PANEL_KEYS}
        return {key: list(widget.value) if isinstance(widget.value, tuple) else widget.value
                for key, widget in self.widgets.items()}

    def save(self) -> Path:
        """Validate the edited parameters and write them to `save_to`; ConfigError if invalid."""
        if not self.interactive:
            raise ConfigError("the panel is headless: it changes nothing")
        edited = copy.deepcopy(self.params)
        _apply_overrides(edited, self.values())
        self.saved_path = dump_params(validate(edited, source="panel"), self.save_to)
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


def bounds_panel(params_file: str | Path, interactive: bool = True, save_to: str | Path | None = None) -> BoundsPanel:
    """The notebooks' ipywidgets panel: edit bounds and budgets, save a new parameter file.

    `save_to` defaults to `<file>_edited.yaml` beside the parameter file.
    """
    return BoundsPanel(params_file, interactive, save_to)
