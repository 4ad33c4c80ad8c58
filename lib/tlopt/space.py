"""Search spaces of every BO step, and the encoding to and from GPyOpt rows.

GPyOpt works on rows of numbers. A `SearchSpace` knows, for each named
hyperparameter, how to turn a value into its column (`encode`) and back
(`decode`). Faithful encodings (SPEC.md section 3) are `index` (a choice is a
GPyOpt `discrete` index, which implies an order that does not exist) and a
`linear` learning rate; the improved defaults are `categorical` (one-hot in
GPyOpt's model) and a `log` learning rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tlopt.errors import ConfigError

STEPS: dict[str, tuple[str, ...]] = {
    "shared": ("model",),
    "separate_hyperparameters": ("model",),
    "separate_optimizations": ("block", "finetune"),
    "joint": ("model",),
}
LAYER_STEP = "layers"


@dataclass(frozen=True)
class Choice:
    """One of a list of names (backbone, optimizer)."""

    name: str
    options: tuple[str, ...]
    encoding: str = "categorical"

    def domain(self) -> dict:
        kind = "categorical" if self.encoding == "categorical" else "discrete"
        return {"name": self.name, "type": kind, "domain": tuple(range(len(self.options)))}

    def encode(self, value: str) -> float:
        return float(self.options.index(value))

    def decode(self, column: float) -> str:
        return self.options[int(round(column))]


@dataclass(frozen=True)
class Rate:
    """A learning rate, searched on a linear or a log10 scale."""

    name: str
    low: float
    high: float
    scale: str = "log"

    def domain(self) -> dict:
        bounds = (self.low, self.high)
        if self.scale == "log":
            bounds = (math.log10(self.low), math.log10(self.high))
        return {"name": self.name, "type": "continuous", "domain": bounds}

    def encode(self, value: float) -> float:
        return math.log10(value) if self.scale == "log" else float(value)

    def decode(self, column: float) -> float:
        return float(10.0**column) if self.scale == "log" else float(column)


@dataclass(frozen=True)
class Layer:
    """The delimiting layer as an index 0..n_layers of the backbone (faithful)."""

    name: str
    n_layers: int

    def domain(self) -> dict:
        return {"name": self.name, "type": "discrete", "domain": tuple(range(self.n_layers + 1))}

    def encode(self, value: int) -> float:
        return float(value)

    def decode(self, column: float) -> int:
        return int(round(column))


@dataclass(frozen=True)
class Fraction:
    """The delimiting layer as a fraction of depth, comparable across backbones."""

    name: str

    def domain(self) -> dict:
        return {"name": self.name, "type": "continuous", "domain": (0.0, 1.0)}

    def encode(self, value: float) -> float:
        return float(value)

    def decode(self, column: float) -> float:
        return float(column)


Variable = Choice | Rate | Layer | Fraction


@dataclass
class SearchSpace:
    """The variables of one BO step; `fixed` holds choices with a single option."""

    variables: list[Variable]
    fixed: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.variables:
            raise ConfigError(
                f"nothing to optimize: every hyperparameter of this step is fixed ({self.fixed})"
            )

    @property
    def names(self) -> list[str]:
        return [variable.name for variable in self.variables]

    @property
    def domain(self) -> list[dict]:
        return [variable.domain() for variable in self.variables]

    def encode(self, hyperparameters: dict[str, Any]) -> np.ndarray:
        """A GPyOpt row (1 x dims) from named values."""
        return np.array([[v.encode(hyperparameters[v.name]) for v in self.variables]], dtype=float)

    def decode(self, row: np.ndarray) -> dict[str, Any]:
        """Named values (fixed ones included) from a GPyOpt row."""
        columns = np.asarray(row, dtype=float).reshape(-1)
        decoded = {v.name: v.decode(c) for v, c in zip(self.variables, columns)}
        return {**self.fixed, **decoded}


def _choice(name: str, options: list[str], encoding: str, fixed: dict) -> list[Variable]:
    """A choice with one option is fixed, not searched: GPyOpt cannot search a single value."""
    if len(options) == 1:
        fixed[name] = options[0]
        return []
    return [Choice(name, tuple(options), encoding)]


def _rate(name: str, params: dict) -> Rate:
    rate = params["learning_rate"]
    return Rate(name, rate["min"], rate["max"], rate["scale"])


def build_space(params: dict, strategy: str, step: str, n_layers: int | None = None) -> SearchSpace:
    """The domain of `step` of `strategy` (SPEC.md section 5), from the parameter file.

    `n_layers` is the chosen backbone's layer count, needed by the layer step
    when the delimiting layer is searched as an index.
    """
    encoding = params["bo"]["encoding"]
    optimizers = params["optimizers"]
    fixed: dict[str, Any] = {}

    if step == LAYER_STEP:
        if params["layer_optimization"]["delimiting"] == "fraction":
            return SearchSpace([Fraction("delimiting_fraction")])
        if n_layers is None:
            raise ValueError("the layer step searches an index: pass the backbone's n_layers")
        return SearchSpace([Layer("delimiting_layer", n_layers)])
    if step not in STEPS.get(strategy, ()):
        raise ConfigError(f"strategy '{strategy}' has no step '{step}' (steps: {STEPS.get(strategy)})")

    if strategy == "separate_optimizations" and step == "finetune":
        # The backbone and block weights come from step A's best trial.
        variables = _choice("optimizer", optimizers, encoding, fixed) + [_rate("learning_rate", params)]
        return SearchSpace(variables, fixed)

    variables = _choice("backbone", params["backbones"], encoding, fixed)
    if strategy == "separate_hyperparameters":
        variables += _choice("block_optimizer", optimizers, encoding, fixed)
        variables += [_rate("block_learning_rate", params)]
        variables += _choice("finetune_optimizer", optimizers, encoding, fixed)
        variables += [_rate("finetune_learning_rate", params)]
    else:
        variables += _choice("optimizer", optimizers, encoding, fixed)
        variables += [_rate("learning_rate", params)]
    if strategy == "joint":
        # The thesis's recommendation: backbone and delimiting layer searched together,
        # the layer as a fraction of depth so that it means the same for every backbone.
        variables.append(Fraction("delimiting_fraction"))
    return SearchSpace(variables, fixed)
