"""Search spaces: domains per strategy and step, encodings, exact round trips."""

import math

import numpy as np
import pytest

from tlopt.errors import ConfigError
from tlopt.params import validate
from tlopt.strategies import LAYER_STEP, REGISTRY, get_strategy


def build_space(params, strategy, step, basis=None):
    return get_strategy(strategy).step(step).space(params, basis)


def make_params(**changes):
    raw = {
        "data": {"root": "data", "image_size": 96},
        "backbones": ["Xception", "VGG16", "ResNet50"],
        "optimizers": ["Nadam", "SGD", "Adam", "Adadelta"],
    }
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        raw.setdefault(section, {})[key] = value
    return validate(raw)


SAMPLES = {
    ("shared", "model"): {"backbone": "VGG16", "optimizer": "Adadelta", "learning_rate": 0.8417},
    ("separate_hyperparameters", "model"): {
        "backbone": "ResNet50", "block_optimizer": "SGD", "block_learning_rate": 0.01,
        "finetune_optimizer": "Nadam", "finetune_learning_rate": 0.002,
    },
    ("separate_optimizations", "block"): {"backbone": "Xception", "optimizer": "Adam", "learning_rate": 0.001},
    ("separate_optimizations", "finetune"): {"optimizer": "SGD", "learning_rate": 0.5},
    ("joint", "model"): {"backbone": "VGG16", "optimizer": "Nadam", "learning_rate": 0.003, "delimiting_fraction": 0.25},
}


@pytest.mark.parametrize("encoding", ["categorical", "index"])
@pytest.mark.parametrize("scale", ["log", "linear"])
@pytest.mark.parametrize("strategy,step", [(s, step) for s, entry in REGISTRY.items() for step in entry.step_names])
def test_every_step_round_trips(strategy, step, encoding, scale):
    params = make_params(bo__encoding=encoding, learning_rate__scale=scale)
    space = build_space(params, strategy, step)
    sample = SAMPLES[(strategy, step)]
    row = space.encode(sample)
    assert row.shape == (1, len(space.domain))
    decoded = space.decode(row)
    assert decoded.keys() == sample.keys()
    for key, value in sample.items():
        if isinstance(value, float):
            assert math.isclose(decoded[key], value, rel_tol=1e-12)
        else:
            assert decoded[key] == value


def test_domains_follow_the_encoding_and_scale():
    faithful = build_space(make_params(bo__encoding="index", learning_rate__scale="linear"), "shared", "model")
    assert [d["type"] for d in faithful.domain] == ["discrete", "discrete", "continuous"]
    assert faithful.domain[0]["domain"] == (0, 1, 2)
    assert faithful.domain[2]["domain"] == (1e-4, 1.0)
    improved = build_space(make_params(), "shared", "model")
    assert [d["type"] for d in improved.domain] == ["categorical", "categorical", "continuous"]
    assert improved.domain[2]["domain"] == pytest.approx((-4.0, 0.0))
    assert build_space(make_params(), "joint", "model").domain[-1] == {
        "name": "delimiting_fraction", "type": "continuous", "domain": (0.0, 1.0)
    }


def test_separate_hyperparameters_has_five_variables_in_spec_order():
    space = build_space(make_params(), "separate_hyperparameters", "model")
    assert space.names == [
        "backbone", "block_optimizer", "block_learning_rate", "finetune_optimizer", "finetune_learning_rate"
    ]


def test_a_single_option_is_fixed_not_searched():
    params = make_params().updated({"backbones": ["VGG16"]})
    space = build_space(params, "shared", "model")
    assert space.names == ["optimizer", "learning_rate"]
    decoded = space.decode(space.encode({"optimizer": "SGD", "learning_rate": 0.1}))
    assert decoded["backbone"] == "VGG16"


def test_layer_step_as_index_or_fraction():
    space = build_space(make_params(), "shared", LAYER_STEP.name, {"backbone": "VGG16"})
    assert space.domain == [{"name": "delimiting_layer", "type": "discrete", "domain": tuple(range(20))}]
    assert space.decode(np.array([[12.0]])) == {"delimiting_layer": 12}
    fraction = build_space(make_params(layer_optimization__delimiting="fraction"), "shared", LAYER_STEP.name,
                           {"backbone": "VGG16"})
    assert fraction.names == ["delimiting_fraction"]


def test_unknown_step_is_a_config_error():
    with pytest.raises(ConfigError, match="strategy 'shared' has no step 'block' \\(steps: model\\)"):
        build_space(make_params(), "shared", "block")
