"""The optimization strategies: one registry entry each, with its steps, spaces, objectives and notebook.

A `Strategy` is a sequence of BO `Step`s (docs/method.md section 5). Each step knows
its search space (from the parameter file and the setup the previous step settled on)
and its objective: a function that trains one trial's hyperparameters and returns an
`Outcome`, the run that is scored (its best validation accuracy is what BO maximizes) and
the `setup`, the complete description of what was trained (backbone, both phases'
optimizer and rate, delimiting layer, block weights). Every strategy ends with
`LAYER_STEP`, which refines the delimiting layer of the strategy's best setup.

Adding a strategy is one `register(Strategy(...))` call and its notebook; the parameter
file, the command line, the driver (`tlopt.optimize`) and the analysis read the registry.
The trainer is injected through the `Context` (`tlopt.training` by default), so that tests
can check the routing with a fake trainer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

from tlopt import backbones
from tlopt.errors import ConfigError
from tlopt.space import Fraction, Layer, Rate, SearchSpace, Variable, choices

if TYPE_CHECKING:
    from tlopt.params import Experiment
    from tlopt.store import RunFolder, TrialFolder


@dataclass
class Context:
    """What every objective of a run needs: the parameters, the split, the trainer.

    `observers` are Keras callbacks that watch every training run (the live figure).
    """

    config: Experiment
    run: RunFolder
    frame: pd.DataFrame
    class_names: list[str]
    trainer: Any
    observers: list = field(default_factory=list)


@dataclass
class Outcome:
    """The scored run of a trial, every phase's result, and the full setup trained."""

    scored: Any
    phases: dict[str, Any]
    setup: dict[str, Any] = field(default_factory=dict)


Objective = Callable[[dict, "TrialFolder"], Outcome]
# The setup a step builds on: the previous step's best trial's, or None for a strategy's first step.
Basis = dict | None


@dataclass(frozen=True)
class Step:
    """One BO step: `space(config, basis)` is its domain, `objective(ctx, basis)` trains a trial."""

    name: str
    space: Callable[[Experiment, Basis], SearchSpace]
    objective: Callable[[Context, Basis], Objective]


@dataclass(frozen=True)
class Strategy:
    """A registered strategy: its steps, in order, and the notebook that runs them.

    `notebook` is the source notebook's name in notebooks/; strategies may share one
    (joint runs notebook 01 with `strategy = "joint"`). `colour` draws it in the figures.
    """

    name: str
    title: str
    steps: tuple[Step, ...]
    notebook: str
    colour: str | None = None

    def step(self, name: str) -> Step:
        """A step of this strategy, or the layer step."""
        for step in (*self.steps, LAYER_STEP):
            if step.name == name:
                return step
        raise ConfigError(f"strategy '{self.name}' has no step '{name}' (steps: {', '.join(self.step_names)})")

    @property
    def step_names(self) -> tuple[str, ...]:
        return tuple(step.name for step in self.steps)


REGISTRY: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    """Add a strategy to the registry (its name must be new)."""
    if strategy.name in REGISTRY:
        raise ValueError(f"a strategy named '{strategy.name}' is registered already")
    REGISTRY[strategy.name] = strategy
    return strategy


def strategy_names() -> list[str]:
    """The registered strategies, in registration order."""
    return list(REGISTRY)


def get_strategy(name: str) -> Strategy:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown strategy '{name}' (known: {', '.join(REGISTRY)})") from None


def strategy_runs(config: Experiment, strategy: str) -> list[tuple[str, Experiment]]:
    """(label, parameters) of each run of a strategy: itself, or one run per backbone.

    Per-backbone mode (`bo.per_backbone`, the thesis's own recommendation) runs the
    strategy and its layer optimization separately for every backbone, labelled
    `strategy@Backbone`, so that no backbone loses only because the default delimiting
    layer suits it badly.
    """
    if not config.bo.per_backbone or len(config.backbones) == 1:
        return [(strategy, config)]
    return [(f"{strategy}@{name}", config.updated({"backbones": [name]})) for name in config.backbones]


# Search spaces


def _rate(name: str, config: Experiment) -> Rate:
    rate = config.learning_rate
    return Rate(name, rate.min, rate.max, rate.scale)


def _model_space(config: Experiment, phases: tuple[str, ...], extra: tuple[Variable, ...] = ()) -> SearchSpace:
    """Backbone, then an optimizer and a rate for each name in `phases` ("" names them plainly)."""
    fixed: dict[str, Any] = {}
    encoding = config.bo.encoding
    variables = choices("backbone", config.backbones, encoding, fixed)
    for phase in phases:
        prefix = f"{phase}_" if phase else ""
        variables += choices(f"{prefix}optimizer", config.optimizers, encoding, fixed)
        variables.append(_rate(f"{prefix}learning_rate", config))
    return SearchSpace([*variables, *extra], fixed)


def one_optimizer_space(config: Experiment, basis: Basis = None) -> SearchSpace:
    """{backbone, optimizer, learning rate}."""
    return _model_space(config, ("",))


def two_optimizer_space(config: Experiment, basis: Basis = None) -> SearchSpace:
    """{backbone, block optimizer and rate, fine-tuning optimizer and rate}."""
    return _model_space(config, ("block", "finetune"))


def joint_space(config: Experiment, basis: Basis = None) -> SearchSpace:
    """{backbone, optimizer, rate, delimiting layer as a fraction of depth}: comparable across backbones."""
    return _model_space(config, ("",), (Fraction("delimiting_fraction"),))


def finetune_space(config: Experiment, basis: Basis = None) -> SearchSpace:
    """{optimizer, rate} for fine-tuning; the backbone and block weights come from the basis."""
    fixed: dict[str, Any] = {}
    variables = choices("optimizer", config.optimizers, config.bo.encoding, fixed)
    return SearchSpace([*variables, _rate("learning_rate", config)], fixed)


def layer_space(config: Experiment, basis: Basis) -> SearchSpace:
    """The delimiting layer of the basis's backbone: an index 0..n_layers, or a fraction of depth."""
    if config.layer_optimization.delimiting == "fraction":
        return SearchSpace([Fraction("delimiting_fraction")])
    return SearchSpace([Layer("delimiting_layer", backbones.layer_count(basis["backbone"]))])


# Objectives


def default_layer(config: Experiment, backbone: str) -> int:
    """The delimiting layer of model optimization: floor(fraction x the backbone's layers)."""
    return backbones.default_delimiting_layer(backbones.layer_count(backbone),
                                              config.training.default_delimiting_fraction)


def layer_from_fraction(backbone: str, fraction: float) -> int:
    count = backbones.layer_count(backbone)
    return min(math.floor(fraction * count), count)


def _train(ctx: Context, phase: str, folder: TrialFolder, setup: dict) -> Any:
    """One training run of a trial: the classification block, or fine-tuning from its weights."""
    common = dict(frame=ctx.frame, class_names=ctx.class_names, folder=folder, config=ctx.config,
                  cache_dir=ctx.run.cache_dir, observers=ctx.observers)
    if phase == "block":
        return ctx.trainer.train_block(setup["backbone"], setup["block_optimizer"], setup["block_learning_rate"],
                                       **common)
    return ctx.trainer.fine_tune(setup["backbone"], setup["finetune_optimizer"], setup["finetune_learning_rate"],
                                 setup["delimiting_layer"], ctx.run.local(setup["block_weights"]), **common)


def train_setup(ctx: Context, folder: TrialFolder, setup: dict) -> Outcome:
    """Train the classification block, then fine-tune from its best weights; fine-tuning is scored.

    `setup` names the backbone, both phases' optimizer and rate and the delimiting layer
    (a trial's setup; the winner's repeats train it again with other seeds).
    """
    block = _train(ctx, "block", folder, setup)
    return _finetune(ctx, folder, {**setup, "block_weights": block.weights_path}, {"block": block})


def _finetune(ctx: Context, folder: TrialFolder, setup: dict, phases: dict | None = None) -> Outcome:
    finetune = _train(ctx, "finetune", folder, setup)
    return Outcome(scored=finetune, phases={**(phases or {}), "finetune": finetune}, setup=setup)


_TWO_OPTIMIZER_KEYS = ("backbone", "block_optimizer", "block_learning_rate", "finetune_optimizer",
                      "finetune_learning_rate")


def _one_optimizer(hp: dict) -> dict:
    """The setup of a shared optimizer and rate: the same for both phases."""
    return {
        "backbone": hp["backbone"],
        "block_optimizer": hp["optimizer"],
        "block_learning_rate": hp["learning_rate"],
        "finetune_optimizer": hp["optimizer"],
        "finetune_learning_rate": hp["learning_rate"],
    }


def shared(ctx: Context, basis: Basis = None) -> Objective:
    """One optimizer and rate for both phases; the default delimiting layer."""

    def objective(hp: dict, folder: TrialFolder) -> Outcome:
        setup = {**_one_optimizer(hp), "delimiting_layer": default_layer(ctx.config, hp["backbone"])}
        return train_setup(ctx, folder, setup)

    return objective


def separate_hyperparameters(ctx: Context, basis: Basis = None) -> Objective:
    """Each phase its own optimizer and rate; the default delimiting layer."""

    def objective(hp: dict, folder: TrialFolder) -> Outcome:
        setup = {key: hp[key] for key in _TWO_OPTIMIZER_KEYS}
        setup["delimiting_layer"] = default_layer(ctx.config, hp["backbone"])
        return train_setup(ctx, folder, setup)

    return objective


def block_only(ctx: Context, basis: Basis = None) -> Objective:
    """The classification block alone is trained and scored."""

    def objective(hp: dict, folder: TrialFolder) -> Outcome:
        setup = {key: value for key, value in _one_optimizer(hp).items() if not key.startswith("finetune")}
        block = _train(ctx, "block", folder, setup)
        return Outcome(scored=block, phases={"block": block}, setup={**setup, "block_weights": block.weights_path})

    return objective


def finetune_basis(ctx: Context, basis: Basis) -> Objective:
    """Fine-tune the basis's best block model with the trial's optimizer and rate; the default layer."""

    def objective(hp: dict, folder: TrialFolder) -> Outcome:
        setup = {
            **basis,
            "finetune_optimizer": hp["optimizer"],
            "finetune_learning_rate": hp["learning_rate"],
            "delimiting_layer": default_layer(ctx.config, basis["backbone"]),
        }
        return _finetune(ctx, folder, setup)

    return objective


def joint(ctx: Context, basis: Basis = None) -> Objective:
    """Backbone, optimizer, rate and delimiting layer (as a fraction of depth) together."""

    def objective(hp: dict, folder: TrialFolder) -> Outcome:
        setup = {**_one_optimizer(hp), "delimiting_fraction": hp["delimiting_fraction"],
                 "delimiting_layer": layer_from_fraction(hp["backbone"], hp["delimiting_fraction"])}
        return train_setup(ctx, folder, setup)

    return objective


def layer_optimization(ctx: Context, basis: Basis) -> Objective:
    """Fine-tune again from the basis's block weights with another delimiting layer."""

    def objective(hp: dict, folder: TrialFolder) -> Outcome:
        setup = {key: value for key, value in basis.items() if key != "delimiting_fraction"}
        if "delimiting_fraction" in hp:
            setup["delimiting_fraction"] = hp["delimiting_fraction"]
            setup["delimiting_layer"] = layer_from_fraction(basis["backbone"], hp["delimiting_fraction"])
        else:
            setup["delimiting_layer"] = hp["delimiting_layer"]
        return _finetune(ctx, folder, setup)

    return objective


LAYER_STEP = Step("layers", layer_space, layer_optimization)

register(Strategy(
    "shared", "Shared hyperparameters",
    (Step("model", one_optimizer_space, shared),),
    notebook="01_shared_strategy", colour="tab:blue",
))
register(Strategy(
    "separate_hyperparameters", "Separate hyperparameters",
    (Step("model", two_optimizer_space, separate_hyperparameters),),
    notebook="02_separate_hyperparameters", colour="tab:orange",
))
register(Strategy(
    "separate_optimizations", "Separate optimizations",
    (Step("block", one_optimizer_space, block_only), Step("finetune", finetune_space, finetune_basis)),
    notebook="03_separate_optimizations", colour="tab:green",
))
register(Strategy(
    "joint", "Joint: backbone and delimiting layer together",
    (Step("model", joint_space, joint),),
    notebook="01_shared_strategy", colour="tab:red",
))
