"""The objective of every BO step: which hyperparameters go to which training phase.

SPEC.md section 5. Each objective takes the decoded hyperparameters of one
trial and returns an `Outcome`: the run that is scored (its best validation
accuracy is what BO maximizes) and the `setup`, the complete description of
what was trained (backbone, both phases' optimizer and rate, delimiting layer,
block weights). Layer optimization and the final evaluation read the best
trial's `setup`, whatever strategy produced it.

The trainer is injected (`tlopt.training` by default), so that tests can
check the routing with a fake trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import pandas as pd

from tlopt import backbones
from tlopt.space import LAYER_STEP


@dataclass
class Context:
    """What every objective of a run needs."""

    params: dict
    frame: pd.DataFrame
    class_names: list[str]
    settings: Any
    trainer: ModuleType | Any
    observers: list = field(default_factory=list)


@dataclass
class Outcome:
    """The scored run of a trial, every phase's result, and the full setup trained."""

    scored: Any
    phases: dict[str, Any]
    setup: dict[str, Any] = field(default_factory=dict)


Objective = Callable[[dict, Path], Outcome]


def _default_layer(ctx: Context, backbone: str) -> int:
    fraction = ctx.params["training"]["default_delimiting_fraction"]
    return backbones.default_delimiting_layer(backbones.layer_count(backbone), fraction)


def _layer_from_fraction(backbone: str, fraction: float) -> int:
    return min(math.floor(fraction * backbones.layer_count(backbone)), backbones.layer_count(backbone))


def _block_and_finetune(ctx: Context, trial_dir: Path, setup: dict) -> Outcome:
    """Train the classification block, then fine-tune from its best weights."""
    block = ctx.trainer.train_block(
        setup["backbone"], setup["block_optimizer"], setup["block_learning_rate"],
        ctx.frame, ctx.class_names, trial_dir, ctx.settings, observers=ctx.observers,
    )
    setup = {**setup, "block_weights": block.weights_path}
    return _finetune(ctx, trial_dir, setup, {"block": block})


def _finetune(ctx: Context, trial_dir: Path, setup: dict, phases: dict | None = None) -> Outcome:
    finetune = ctx.trainer.fine_tune(
        setup["backbone"], setup["finetune_optimizer"], setup["finetune_learning_rate"],
        setup["delimiting_layer"], setup["block_weights"],
        ctx.frame, ctx.class_names, trial_dir, ctx.settings, observers=ctx.observers,
    )
    return Outcome(scored=finetune, phases={**(phases or {}), "finetune": finetune}, setup=setup)


def _same_rate_both_phases(hp: dict) -> dict:
    return {
        "backbone": hp["backbone"],
        "block_optimizer": hp["optimizer"],
        "block_learning_rate": hp["learning_rate"],
        "finetune_optimizer": hp["optimizer"],
        "finetune_learning_rate": hp["learning_rate"],
    }


def shared(ctx: Context) -> Objective:
    """One optimizer and rate for both phases; the default delimiting layer."""

    def objective(hp: dict, trial_dir: Path) -> Outcome:
        setup = _same_rate_both_phases(hp)
        setup["delimiting_layer"] = _default_layer(ctx, hp["backbone"])
        return _block_and_finetune(ctx, trial_dir, setup)

    return objective


def separate_hyperparameters(ctx: Context) -> Objective:
    """Each phase its own optimizer and rate; the default delimiting layer."""

    def objective(hp: dict, trial_dir: Path) -> Outcome:
        setup = {key: hp[key] for key in (
            "backbone", "block_optimizer", "block_learning_rate",
            "finetune_optimizer", "finetune_learning_rate",
        )}
        setup["delimiting_layer"] = _default_layer(ctx, hp["backbone"])
        return _block_and_finetune(ctx, trial_dir, setup)

    return objective


def separate_block(ctx: Context) -> Objective:
    """Step A of separate optimizations: the classification block alone is scored."""

    def objective(hp: dict, trial_dir: Path) -> Outcome:
        block = ctx.trainer.train_block(
            hp["backbone"], hp["optimizer"], hp["learning_rate"],
            ctx.frame, ctx.class_names, trial_dir, ctx.settings, observers=ctx.observers,
        )
        setup = {
            "backbone": hp["backbone"],
            "block_optimizer": hp["optimizer"],
            "block_learning_rate": hp["learning_rate"],
            "block_weights": block.weights_path,
        }
        return Outcome(scored=block, phases={"block": block}, setup=setup)

    return objective


def separate_finetune(ctx: Context, best_block: dict) -> Objective:
    """Step B: fine-tune the best block model of step A with the trial's optimizer and rate."""

    def objective(hp: dict, trial_dir: Path) -> Outcome:
        setup = {
            **best_block,
            "finetune_optimizer": hp["optimizer"],
            "finetune_learning_rate": hp["learning_rate"],
            "delimiting_layer": _default_layer(ctx, best_block["backbone"]),
        }
        return _finetune(ctx, trial_dir, setup)

    return objective


def joint(ctx: Context) -> Objective:
    """Backbone, optimizer, rate and delimiting layer (as a fraction of depth) together."""

    def objective(hp: dict, trial_dir: Path) -> Outcome:
        setup = _same_rate_both_phases(hp)
        setup["delimiting_fraction"] = hp["delimiting_fraction"]
        setup["delimiting_layer"] = _layer_from_fraction(hp["backbone"], hp["delimiting_fraction"])
        return _block_and_finetune(ctx, trial_dir, setup)

    return objective


def layer_optimization(ctx: Context, best: dict) -> Objective:
    """Fine-tune again from the best trial's block weights with another delimiting layer."""

    def objective(hp: dict, trial_dir: Path) -> Outcome:
        setup = {key: value for key, value in best.items() if key != "delimiting_fraction"}
        if "delimiting_fraction" in hp:
            setup["delimiting_fraction"] = hp["delimiting_fraction"]
            setup["delimiting_layer"] = _layer_from_fraction(best["backbone"], hp["delimiting_fraction"])
        else:
            setup["delimiting_layer"] = hp["delimiting_layer"]
        return _finetune(ctx, trial_dir, setup)

    return objective


def objective_for(ctx: Context, strategy: str, step: str, best: dict | None = None) -> Objective:
    """The objective of `step` of `strategy`; `best` is the setup a later step builds on."""
    if step == LAYER_STEP:
        return layer_optimization(ctx, best)
    if strategy == "separate_optimizations":
        return separate_block(ctx) if step == "block" else separate_finetune(ctx, best)
    return {"shared": shared, "separate_hyperparameters": separate_hyperparameters, "joint": joint}[
        strategy
    ](ctx)
