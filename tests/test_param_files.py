"""The shipped parameter files: each one valid, the thesis files faithful to the method (docs/method.md)."""

import typing
from pathlib import Path

import pytest

from pydantic import BaseModel

from tlopt.backbones import THESIS_BACKBONES
from tlopt.params import THESIS_OPTIMIZERS, Experiment, load_params

PARAMS = Path(__file__).resolve().parent.parent / "params"
README = PARAMS.parent / "README.md"


@pytest.mark.parametrize("name", ["ci", "demo", "imbalanced_demo", "kvasir", "nerthus", "thesis_kvasir",
                                  "thesis_nerthus"])
def test_every_shipped_file_is_valid_and_keeps_its_results_in_the_repository(name):
    params = load_params(PARAMS / f"{name}.yaml")
    assert params.run_name == name
    assert Path(params.results_dir) == PARAMS.parent / "results"
    assert Path(params.data.root).parent == PARAMS.parent / "data"


@pytest.mark.parametrize("dataset, folder", [("kvasir", "kvasir-dataset-v2"), ("nerthus", "nerthus-dataset-frames")])
def test_thesis_files_are_faithful(dataset, folder):
    params = load_params(PARAMS / f"thesis_{dataset}.yaml")
    data, training, bo = params.data, params.training, params.bo
    assert Path(data.root).name == folder
    assert (data.image_size, data.batch_size, data.val_fraction, data.test_fraction) == (299, 16, 0.3, 0.0)
    assert data.group_pattern is None
    assert params.backbones == list(THESIS_BACKBONES) and params.optimizers == list(THESIS_OPTIMIZERS)
    assert (params.weights, params.pooling) == ("imagenet", "max")
    assert params.learning_rate.model_dump() == {"min": 1e-4, "max": 1.0, "scale": "linear"}
    assert (training.block_epochs, training.finetune_epochs, training.early_stopping_patience) == (10, 50, 5)
    filtering = training.nonconvergence
    assert (filtering.enabled, filtering.patience, filtering.mode) == (True, 5, "auto")
    assert (params.nonconvergence_monitor, params.nonconvergence_threshold) == ("val_accuracy", 0.5)
    assert (params.objective, training.class_weight) == ("val_accuracy", "none")
    assert (data.manifest, data.group_by, data.external_test) == (None, "filename", None)
    assert training.default_delimiting_fraction == pytest.approx(2 / 3)
    assert not training.feature_cache, "the thesis trained the block on flipped images, not cached features"
    assert (bo.method, bo.initial_points, bo.iterations, bo.acquisition) == ("bayesian", 5, 10, "EI")
    assert (bo.encoding, bo.eps, bo.per_backbone) == ("index", 1e-8, False)
    assert params.strategies == ["shared", "separate_hyperparameters", "separate_optimizations"]
    assert params.layer_optimization.model_dump() == {"enabled": True, "delimiting": "index"}


def test_the_imbalanced_demo_optimizes_balanced_accuracy_with_balanced_class_weights():
    params = load_params(PARAMS / "imbalanced_demo.yaml")
    assert (params.objective, params.training.class_weight) == ("balanced_accuracy", "balanced")
    assert params.data.demo.imbalance < 1 and params.weights is None
    assert (params.nonconvergence_monitor, params.nonconvergence_threshold) == ("val_balanced_accuracy",
                                                                                "chance+0.05")


def test_nerthus_keeps_each_video_on_one_side():
    params = load_params(PARAMS / "nerthus.yaml")
    assert params.data.group_pattern == r"bowel_(\d+)_" and params.data.test_fraction > 0


def section_of(annotation) -> type[BaseModel] | None:
    """The nested section a field holds (`DemoData | None` holds DemoData), or None for a value."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def schema_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of the parameter schema, sections included."""
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        section = section_of(field.annotation)
        if section is not None:
            keys += schema_keys(section, f"{prefix}{name}.")
    return keys


def test_the_readme_documents_every_parameter():
    reference = README.read_text().split("## Parameter reference", 1)[1]
    keys = schema_keys(Experiment)
    leaves = [key for key in keys if not any(other.startswith(key + ".") for other in keys)]
    assert "training.nonconvergence.patience" in leaves and "data.demo.num_classes" in leaves
    missing = [key for key in leaves if f"| `{key}` |" not in reference]
    assert not missing, f"README's parameter reference lacks {missing}"
