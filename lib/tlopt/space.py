"""Search spaces and the encoding of hyperparameters to and from GPyOpt rows.

GPyOpt works on rows of numbers. A `SearchSpace` knows, for each named
hyperparameter, how to turn a value into its column (`encode`) and back
(`decode`). Faithful encodings (docs/method.md section 3) are `index` (a choice is a
GPyOpt `discrete` index, which implies an order that does not exist) and a
`linear` learning rate; the improved defaults are `categorical` (one-hot in
GPyOpt's model) and a `log` learning rate. Which variables each step searches is the
strategy registry's business (`tlopt.strategies`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tlopt.errors import ConfigError

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


def choices(name: str, options: list[str], encoding: str, fixed: dict[str, Any]) -> list[Variable]:
    """A choice among `options`; with one option it is fixed (GPyOpt cannot search a single value)."""
    if len(options) == 1:
        fixed[name] = options[0]
        return []
    return [Choice(name, tuple(options), encoding)]
