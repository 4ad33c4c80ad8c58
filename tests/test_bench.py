"""The benchmark scripts' own logic: the GPU projection's arithmetic and the KerasTuner side's trial."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import gpu_throughput  # noqa: E402


def test_projection_of_one_backbone_counts_every_run_and_epoch():
    hours = gpu_throughput.project_hours({"A": 100.0}, {"A": 400.0})
    block_run = 10 * (5600 + 2400) / 400  # frozen backbone: a forward pass per image
    finetune_run = 50 * (5600 / 100 + 2400 / 400)
    assert hours["faithful"] == pytest.approx((45 * block_run + 90 * finetune_run) / 3600)
    extraction = (4 * 5600 + 2400) / 400  # four flip variants of the training images, plus validation
    assert hours["feature_cache"] == pytest.approx((extraction + 90 * finetune_run) / 3600)


def test_projection_averages_runs_over_backbones_and_extracts_each_once():
    hours = gpu_throughput.project_hours({"A": 100.0, "B": 50.0}, {"A": 400.0, "B": 200.0})
    block_run = (10 * 8000 / 400 + 10 * 8000 / 200) / 2
    finetune_run = (50 * (5600 / 100 + 2400 / 400) + 50 * (5600 / 50 + 2400 / 200)) / 2
    extraction = 24800 / 400 + 24800 / 200
    assert hours["faithful"] == pytest.approx((45 * block_run + 90 * finetune_run) / 3600)
    assert hours["feature_cache"] == pytest.approx((extraction + 90 * finetune_run) / 3600)


def test_projection_needs_the_same_backbones_for_both_throughputs():
    with pytest.raises(ValueError):
        gpu_throughput.project_hours({"A": 1.0}, {"B": 1.0})


def test_comparable_parameters_and_the_search_kerastuner_gets_from_them(tmp_path):
    import kerastuner_side
    from tlopt.params import load_params

    demo = load_params(kerastuner_side.DEMO_PARAMS, {"results_dir": str(tmp_path)})
    params = kerastuner_side.comparable(demo, initial_points=2, iterations=1)
    assert params.strategies == ["joint"] and not params.layer_optimization.enabled
    assert not params.training.nonconvergence.enabled
    search = kerastuner_side.Search.from_params(params)
    assert search.trials == 3 and search.initial_points == 2
    assert search.backbones == tuple(demo.backbones) and search.optimizers == tuple(demo.optimizers)
    assert search.learning_rate == (demo.learning_rate.min, demo.learning_rate.max)
    assert (search.block_epochs, search.finetune_epochs, search.patience) == (
        demo.training.block_epochs, demo.training.finetune_epochs,
        demo.training.early_stopping_patience,
    )


def test_measurement_order_puts_the_thesis_setting_then_the_fastest_first():
    order = gpu_throughput.measurement_order(("float32", "mixed_float16"), (16, 64))
    assert order[:2] == [("float32", 16), ("mixed_float16", 64)]
    assert sorted(order) == sorted({(p, b) for p in ("float32", "mixed_float16") for b in (16, 64)})


def test_concurrent_trials_add_up_their_throughput_and_a_failure_is_named():
    two = gpu_throughput.combine(2, [{"images": 640, "seconds": 20.0}, {"images": 480, "seconds": 16.0}])
    assert (two.total, two.per_trial) == (62.0, 31.0)
    failed = gpu_throughput.combine(4, [{"images": 1, "seconds": 1.0}, {"error": "ResourceExhaustedError: OOM"}])
    assert failed.total is None and failed.failure == "ResourceExhaustedError: OOM"
    assert gpu_throughput.combine(2, [{"images": 1, "seconds": 1.0}]).failure == "1 trial(s) missing"
    table = gpu_throughput.scaling_table([gpu_throughput.combine(1, [{"images": 400, "seconds": 10.0}]), two, failed])
    assert table.splitlines()[2:] == ["| 1 | 40 | 40 | 1.00x |", "| 2 | 62 | 31 | 1.55x |",
                                      "| 4 | failed: ResourceExhaustedError: OOM | | |"]


@pytest.mark.slow
def test_kerastuner_trial_trains_the_block_frozen_then_fine_tunes_from_the_delimiting_layer(tmp_path):
    import keras

    import kerastuner_side
    from tlopt import data
    from tlopt.demo_data import generate_demo_dataset

    root = generate_demo_dataset(tmp_path / "demo", images_per_class=4, image_size=32, num_classes=2)
    frame = data.split(data.discover(root), val_fraction=0.5)
    search = kerastuner_side.Search(
        backbones=("VGG16",), optimizers=("Adam", "SGD"), learning_rate=(1e-4, 1e-1), initial_points=1,
        trials=1, block_epochs=1, finetune_epochs=2, patience=5, image_size=32, batch_size=4, weights=None, seed=0,
    )
    seen = []

    class Recorder(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            base = kerastuner_side.backbone_of(self.model)
            seen.append({"trainable": [layer.trainable for layer in base.layers], "val_accuracy": []})

        def on_epoch_end(self, epoch, logs=None):
            seen[-1]["val_accuracy"].append(logs["val_accuracy"])

    class RecordingTuner(kerastuner_side.TwoPhaseTuner):
        def _callbacks(self):
            return [*super()._callbacks(), Recorder()]

    tuner = RecordingTuner(search, frame, data.class_names(frame), tmp_path / "kt", project_name="test",
                           overwrite=True)
    trial = tuner.oracle.create_trial("tuner0")
    hp = trial.hyperparameters
    assert hp["backbone"] == "VGG16" and hp["optimizer"] in search.optimizers
    assert search.learning_rate[0] <= hp["learning_rate"] <= search.learning_rate[1]
    result = tuner.run_trial(trial)

    block, finetune = seen
    assert not any(block["trainable"]) and len(block["val_accuracy"]) == 1
    layer = math.floor(hp["delimiting_fraction"] * len(finetune["trainable"]))
    assert finetune["trainable"] == [index >= layer for index in range(len(finetune["trainable"]))]
    assert result == {"val_accuracy": max(finetune["val_accuracy"]), "epochs": 3}
