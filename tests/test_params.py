"""The parameter file: defaults, path resolution, and one clear line per mistake."""

import textwrap

import pytest
import yaml

from tlopt.errors import ConfigError
from tlopt.params import dump_params, load_params


def write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_are_the_spec_values(tmp_path):
    params = load_params(write(tmp_path, "data: {root: images}\n"))
    assert params.data.image_size == 299
    assert params.data.batch_size == 16
    assert params.data.val_fraction == 0.3
    assert params.backbones[0] == "Xception" and len(params.backbones) == 9
    assert params.optimizers == ["Nadam", "SGD", "RMSprop", "Adagrad", "Adam", "Adamax", "Adadelta"]
    assert params.training.block_epochs == 10 and params.training.finetune_epochs == 50
    filtering = params.training.nonconvergence
    assert (filtering.enabled, filtering.patience, filtering.mode) == (True, 5, "auto")
    assert (params.nonconvergence_monitor, params.nonconvergence_threshold) == ("val_accuracy", 0.5)
    assert (params.objective, params.training.class_weight) == ("val_accuracy", "none")
    assert params.bo.initial_points == 5 and params.bo.iterations == 10 and params.bo.budget == 15
    assert params.bo.eps == 1e-8 and params.bo.acquisition == "EI"
    assert params.pooling == "max" and params.weights == "imagenet"
    assert params.strategies == ["shared", "separate_hyperparameters", "separate_optimizations"]


def test_relative_paths_resolve_against_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    params = load_params(write(tmp_path, "data: {root: ../images}\nresults_dir: out\n", "sub/exp.yaml"))
    assert params.data.root == str(tmp_path / "images")
    assert params.results_dir == str(tmp_path / "sub" / "out")


def test_scientific_notation_is_a_float(tmp_path):
    params = load_params(write(tmp_path, "data: {root: d}\nlearning_rate: {min: 1e-5, max: 1E-1}\n"))
    assert params.learning_rate.model_dump() == {"min": 1e-5, "max": 0.1, "scale": "log"}


def test_overrides_use_dotted_keys(tmp_path):
    path = write(tmp_path, "data: {root: d}\n")
    params = load_params(path, {"training.nonconvergence.enabled": False, "run_name": "x"})
    assert params.value("training.nonconvergence.enabled") is False
    assert params.run_name == "x"


def test_the_configuration_is_read_only_and_updated_by_copy(tmp_path):
    params = load_params(write(tmp_path, "data: {root: d}\n"))
    with pytest.raises(Exception, match="frozen"):
        params.seed = 3
    changed = params.updated({"seed": 3, "bo.iterations": 2})
    assert (changed.seed, changed.bo.iterations, params.seed, params.bo.iterations) == (3, 2, 0, 10)
    with pytest.raises(ConfigError, match="parameters: bo.iterations: Input should be greater than or equal to 0"):
        params.updated({"bo.iterations": -1})


@pytest.mark.parametrize(
    "text,message",
    [
        ("data: {root: d}\nbakbones: [VGG16]\n", "unknown key 'bakbones'"),
        ("data: {root: d, image_sise: 64}\n", "unknown key 'data.image_sise'"),
        ("data: {root: d, batch_size: '16'}\n", "data.batch_size: Input should be a valid integer"),
        ("data: {root: d}\nlearning_rate: {min: 0.1, max: 0.01}\n",
         "learning_rate: min must be below max (got min=0.1, max=0.01)"),
        ("data: {root: d}\nbackbones: [VGG16, ResNet1000]\n", "backbones: unknown backbone 'ResNet1000'"),
        ("data: {root: d}\noptimizers: [Adam, Lion]\n", "optimizers: unknown optimizer 'Lion'"),
        ("data: {root: d, image_size: 64}\nbackbones: [VGG16, Xception]\n",
         "data.image_size: 64 px is below Xception's minimum of 71 px"),
        ("data: {root: d, val_fraction: 0.6, test_fraction: 0.4}\n", "val_fraction + test_fraction must be below 1"),
        ("data: {root: d}\nstrategies: [shared, greedy]\n", "strategies: unknown strategy 'greedy' (known: shared,"),
        ("data: {root: d}\nbackbones: [VGG16, VGG16]\n", "backbones: names must not repeat"),
        ("seed: 1\n", "missing key 'data'"),
        ("data: {root: d}\nbo: {encoding: onehot}\n", "bo.encoding: Input should be 'categorical' or 'index'"),
        ("data: {root: d}\ntraining: {nonconvergence: {patience: -1}}\n", "training.nonconvergence.patience"),
        ("data: {root: d, group_pattern: 'bowel_\\d+'}\n", "needs a capture group"),
        ("data: [1, 2\n", "not valid YAML"),
    ],
)
def test_bad_values_get_one_line_naming_them(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_params(path)
    text = str(caught.value)
    assert message in text
    assert "\n" not in text
    assert text.startswith(str(path)) or "parameter file" in text


def test_missing_file_and_missing_weights_file(tmp_path):
    with pytest.raises(ConfigError, match="parameter file not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="weights: file not found"):
        load_params(write(tmp_path, "data: {root: d}\nweights: missing.h5\n"))


def test_dump_round_trips(tmp_path):
    params = load_params(write(tmp_path, "data: {root: d}\nseed: 7\n"))
    path = dump_params(params, tmp_path / "out" / "params.yaml")
    assert yaml.safe_load(path.read_text()) == params.to_dict()
    assert load_params(path) == params
