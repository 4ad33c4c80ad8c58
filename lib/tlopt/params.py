"""The experiment's parameter file: the typed configuration every module reads.

One YAML file describes an experiment. `load_params` validates it into an `Experiment`,
a frozen pydantic model whose sections (`data`, `training`, `bo`, ...) are passed to the
modules that need them; a new key is one line in its section here and is read where it is
used. Every error becomes one line that names the file, the dotted key and the offending
value, because a traceback helps nobody who mistyped a key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tlopt import backbones, objectives, strategies
from tlopt.errors import ConfigError
from tlopt.files import atomic_write_text

THESIS_OPTIMIZERS = ("Nadam", "SGD", "RMSprop", "Adagrad", "Adam", "Adamax", "Adadelta")
THESIS_STRATEGIES = ("shared", "separate_hyperparameters", "separate_optimizations")


class _Section(BaseModel):
    """Unknown keys are errors; types are checked strictly (an int is a valid float); read-only."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DemoData(_Section):
    """Generate the embedded demo dataset into `data.root` before discovering it."""

    images_per_class: int = Field(50, ge=4)
    image_size: int = Field(96, ge=32)
    num_classes: int = Field(4, ge=2, le=8)
    # The last class gets this share of images_per_class: a rare class, for the imbalance path.
    imbalance: float | None = Field(None, gt=0, le=1)


class Data(_Section):
    root: str | None = None
    manifest: str | None = None
    image_size: int = Field(299, ge=32)
    batch_size: int = Field(16, ge=1)
    val_fraction: float = Field(0.3, gt=0, lt=1)
    test_fraction: float = Field(0.0, ge=0, lt=1)
    group_by: Literal["filename", "folder"] = "filename"
    group_pattern: str | None = None
    external_test: str | None = None
    on_bad_image: Literal["skip", "error"] = "skip"
    image_cache: bool = True
    demo: DemoData | None = None

    @property
    def location(self) -> str:
        """Where the dataset is: its folder, or its manifest file."""
        return self.root if self.root is not None else self.manifest

    @model_validator(mode="after")
    def _check(self) -> "Data":
        if (self.root is None) == (self.manifest is None):
            raise ValueError("give data.root (a folder per class) or data.manifest (a CSV file of images), not both")
        if self.manifest is not None and (self.demo is not None or self.group_by == "folder"):
            raise ValueError("data.demo and group_by: folder read a folder per class (data.root), not a manifest")
        if self.group_by == "folder" and self.group_pattern is not None:
            raise ValueError("group_pattern applies to group_by: filename; group_by: folder groups by patient folder")
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
    """`monitor` None follows the objective; `threshold` None is the monitor's default
    (`objectives.default_threshold`); a string threshold is relative to chance."""

    enabled: bool = True
    monitor: str | None = None
    threshold: float | str | None = None
    patience: int = Field(5, ge=0)
    mode: Literal["auto", "min", "max"] = "auto"

    @field_validator("threshold")
    @classmethod
    def _relative_to_chance(cls, threshold: float | str | None) -> float | str | None:
        if threshold is not None:
            objectives.check_threshold(threshold)
        return threshold

    @model_validator(mode="after")
    def _chance_is_defined(self) -> "Nonconvergence":
        """A threshold relative to chance (also the default one) needs a monitor whose chance level is known."""
        if self.monitor is not None and objectives.of_key(self.monitor) is None and (
                self.threshold is None or isinstance(self.threshold, str)):
            raise ValueError(f"monitor {self.monitor!r} has no chance level: give a number as threshold "
                             f"(chance is known for {', '.join(o.key for o in objectives.OBJECTIVES.values())})")
        return self


class Training(_Section):
    block_epochs: int = Field(10, ge=1)
    finetune_epochs: int = Field(50, ge=1)
    early_stopping_patience: int = Field(5, ge=1)
    nonconvergence: Nonconvergence = Nonconvergence()
    class_weight: Literal["none", "balanced"] = "none"
    default_delimiting_fraction: float = Field(2 / 3, ge=0, le=1)
    feature_cache: bool = True
    activation_cache: bool = True
    activation_cache_max_gb: float = Field(10.0, ge=0)
    mixed_precision: bool = False
    jit_compile: bool = False
    keep_weights: Literal["best", "all"] = "best"


class BayesianOptimization(_Section):
    method: Literal["bayesian", "random"] = "bayesian"
    initial_points: int = Field(5, ge=1)
    iterations: int = Field(10, ge=0)
    eps: float = Field(1e-8, ge=0)
    acquisition: Literal["EI", "MPI", "LCB"] = "EI"
    encoding: Literal["categorical", "index"] = "categorical"
    per_backbone: bool = False
    max_consecutive_failures: int = Field(3, ge=1)

    @property
    def budget(self) -> int:
        """The trials of one step: the random initial design, then the BO iterations."""
        return self.initial_points + self.iterations


class LayerOptimization(_Section):
    enabled: bool = True
    delimiting: Literal["index", "fraction"] = "index"


class Final(_Section):
    """The end of a run: the final models' intervals and explanation maps, the winner's repeats (docs/method.md section 14)."""

    bootstrap_samples: int = Field(1000, ge=100)
    explain_images: int = Field(2, ge=0)
    repeats: int = Field(0, ge=0)


class Execution(_Section):
    """How many trials of a BO step run at once, and where (docs/method.md section 4.1).

    `parallel_trials` and `schedule` decide the points a step evaluates; the other keys
    only say where its trials run (a resumed run may change them).
    """

    parallel_trials: int = Field(1, ge=1)
    ray_address: str | None = None
    gpus_per_trial: float | None = Field(None, ge=0)
    cpus_per_trial: float | None = Field(None, gt=0)
    schedule: Literal["ordered", "asap"] = "ordered"

    @field_validator("gpus_per_trial")
    @classmethod
    def _whole_above_one(cls, value: float | None) -> float | None:
        if value is not None and value > 1 and value != int(value):
            raise ValueError(f"a trial takes a fraction of one GPU or whole GPUs (got {value})")
        return value


class Experiment(_Section):
    """A whole parameter file, validated, every default filled and every path absolute."""

    run_name: str = Field("experiment", pattern=r"^[A-Za-z0-9_.-]+$")
    results_dir: str = "results"
    seed: int = 0
    objective: Literal["val_accuracy", "balanced_accuracy", "macro_f1", "val_loss"] = "val_accuracy"
    data: Data
    backbones: list[str] = Field(default_factory=lambda: list(backbones.THESIS_BACKBONES), min_length=1)
    weights: str | None = "imagenet"
    pooling: Literal["max", "avg"] = "max"
    optimizers: list[str] = Field(default_factory=lambda: list(THESIS_OPTIMIZERS), min_length=1)
    learning_rate: LearningRate = LearningRate()
    training: Training = Training()
    bo: BayesianOptimization = BayesianOptimization()
    strategies: list[str] = Field(default_factory=lambda: list(THESIS_STRATEGIES), min_length=1)
    layer_optimization: LayerOptimization = LayerOptimization()
    final: Final = Final()
    execution: Execution = Execution()

    @model_validator(mode="before")
    @classmethod
    def _defaults_left_out(cls, raw: Any) -> Any:
        """A nonconvergence monitor equal to the objective's key, and a threshold equal to the monitor's
        default, are stored as unset (None): a run started before these keys followed the objective
        (`monitor: val_accuracy`, `threshold: 0.5`) then compares equal to one that leaves them out."""
        if not isinstance(raw, dict):
            return raw
        training = raw.get("training")
        filtering = training.get("nonconvergence") if isinstance(training, dict) else None
        if not isinstance(filtering, dict) or not isinstance(raw.get("objective", objectives.DEFAULT), str):
            return raw
        key = objectives.OBJECTIVES.get(raw.get("objective", objectives.DEFAULT))
        filtering = dict(filtering)
        if key is not None and filtering.get("monitor") == key.key:
            filtering["monitor"] = None
        monitor = filtering.get("monitor") or (key.key if key else None)
        if monitor is not None and filtering.get("threshold") == objectives.default_threshold(monitor):
            filtering["threshold"] = None
        return {**raw, "training": {**training, "nonconvergence": filtering}}

    @property
    def nonconvergence_monitor(self) -> str:
        """The log key nonconvergence filtering watches: `training.nonconvergence.monitor`, or the objective's."""
        return self.training.nonconvergence.monitor or objectives.get(self.objective).key

    @property
    def nonconvergence_threshold(self) -> float | str:
        """Its threshold as the file gives it (a number, or relative to chance), or the monitor's default."""
        threshold = self.training.nonconvergence.threshold
        return objectives.default_threshold(self.nonconvergence_monitor) if threshold is None else threshold

    @field_validator("backbones")
    @classmethod
    def _known_backbones(cls, names: list[str]) -> list[str]:
        return _known(names, list(backbones.BACKBONES), "backbone")

    @field_validator("optimizers")
    @classmethod
    def _known_optimizers(cls, names: list[str]) -> list[str]:
        return _known(names, list(THESIS_OPTIMIZERS), "optimizer")

    @field_validator("strategies")
    @classmethod
    def _known_strategies(cls, names: list[str]) -> list[str]:
        return _known(names, strategies.strategy_names(), "strategy")

    def value(self, dotted: str) -> Any:
        """The value of a dotted key (`training.nonconvergence.enabled`)."""
        value: Any = self
        for part in dotted.split("."):
            value = getattr(value, part)
        return value

    def to_dict(self) -> dict:
        """Plain values, as the YAML file holds them."""
        return self.model_dump(mode="python")

    def updated(self, overrides: dict[str, Any], source: str = "parameters") -> "Experiment":
        """A validated copy with dotted keys set to new values."""
        raw = self.to_dict()
        _apply_overrides(raw, overrides)
        return validate(raw, source)


def _known(names: list[str], known: list[str], kind: str) -> list[str]:
    for name in names:
        if name not in known:
            raise ValueError(f"unknown {kind} '{name}' (known: {', '.join(known)})")
    if len(set(names)) != len(names):
        raise ValueError(f"names must not repeat (got {names})")
    return names


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


def _describe(error: ValidationError, source: str) -> str:
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


def _check_image_size(config: Experiment, source: str) -> None:
    """Every backbone the search may choose must accept the image size."""
    for name in config.backbones:
        minimum = backbones.BACKBONES[name].min_input_size
        if config.data.image_size < minimum:
            raise ConfigError(
                f"{source}: data.image_size: {config.data.image_size} px is below "
                f"{name}'s minimum of {minimum} px"
            )


def _resolved_paths(config: Experiment, base: Path) -> Experiment:
    """Relative paths in the file are relative to the file's own folder."""
    weights = config.weights
    if weights not in (None, "imagenet"):
        path = (base / weights).resolve()
        if not path.is_file():
            raise ConfigError(f"weights: file not found: {path}")
        weights = str(path)
    locations = {key: str((base / value).resolve()) for key in ("root", "manifest", "external_test")
                 if (value := getattr(config.data, key)) is not None}
    return config.model_copy(update={
        "data": config.data.model_copy(update=locations),
        "results_dir": str((base / config.results_dir).resolve()),
        "weights": weights,
    })


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


def validate(raw: Any, source: str = "parameters", base: Path | None = None) -> Experiment:
    """Validate a raw mapping and fill every default; with `base`, resolve relative paths against it."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of keys, got {type(raw).__name__}")
    try:
        config = Experiment.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_describe(error, source)) from None
    _check_image_size(config, source)
    return config if base is None else _resolved_paths(config, base)


def read_yaml(path: str | Path) -> Any:
    """A YAML file as plain values; ConfigError with the file's name when it is not YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"parameter file not found: {path}")
    try:
        return yaml.load(path.read_text(), Loader=_float_aware_loader()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None


def load_params(path: str | Path, overrides: dict[str, Any] | None = None) -> Experiment:
    """Load a parameter file; `overrides` are dotted keys applied before validation."""
    raw = read_yaml(path)
    if overrides and isinstance(raw, dict):
        _apply_overrides(raw, overrides)
    return validate(raw, source=str(path), base=Path(path).parent)


def dump_params(config: Experiment, path: str | Path) -> Path:
    """Write the parameters as YAML atomically (the resolved copy a run folder keeps)."""
    return atomic_write_text(Path(path), yaml.safe_dump(config.to_dict(), sort_keys=False))
