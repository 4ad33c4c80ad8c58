"""The benchmark scripts' own logic: the GPU projection's arithmetic and the race with KerasTuner."""

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


def test_comparable_parameters_search_joint_alone_with_the_users_nonconvergence_filter(tmp_path):
    import kerastuner_side
    from tlopt.params import load_params

    demo = load_params(kerastuner_side.DEMO_PARAMS, {"results_dir": str(tmp_path)})
    params = kerastuner_side.comparable(demo, initial_points=3, iterations=7)
    assert params.strategies == ["joint"] and not params.layer_optimization.enabled
    assert params.training.nonconvergence == demo.training.nonconvergence
    assert (params.bo.initial_points, params.bo.budget) == (3, 10)


def test_kerastuner_hyperparameters_are_tlopts_joint_space(tmp_path):
    import keras_tuner

    import kerastuner_side
    from tlopt.params import load_params

    demo = load_params(kerastuner_side.DEMO_PARAMS, {"results_dir": str(tmp_path)})
    one_backbone = kerastuner_side.comparable(demo, 3, 7)
    hp = keras_tuner.HyperParameters()
    kerastuner_side.declare_hyperparameters(hp, one_backbone)
    assert [type(space).__name__ for space in hp.space] == ["Fixed", "Choice", "Float", "Float"]
    backbone, optimizer, rate, fraction = hp.space
    assert (backbone.name, backbone.value) == ("backbone", "VGG16")
    assert (optimizer.name, list(optimizer.values)) == ("optimizer", list(demo.optimizers))
    assert (rate.name, rate.min_value, rate.max_value, rate.sampling) == (
        "learning_rate", demo.learning_rate.min, demo.learning_rate.max, "log")
    assert (fraction.name, fraction.min_value, fraction.max_value) == ("delimiting_fraction", 0.0, 1.0)

    two_backbones = one_backbone.updated({"backbones": ["VGG16", "VGG19"], "learning_rate.scale": "linear"})
    hp = keras_tuner.HyperParameters()
    kerastuner_side.declare_hyperparameters(hp, two_backbones)
    assert list(hp.space[0].values) == ["VGG16", "VGG19"] and hp.space[2].sampling == "linear"


def result(seed, seconds, best, block=1.0, finetune=2.0, epochs=10):
    import kerastuner_side

    return kerastuner_side.SearchResult(seed=seed, seconds=seconds, cpu_seconds=2 * seconds, best_val_accuracy=best,
                                        trials=10, epochs=epochs, block_seconds=block, finetune_seconds=finetune,
                                        stopped_early=3)


def test_race_reports_the_ratio_of_median_times_and_the_difference_of_median_bests():
    import kerastuner_side

    race = kerastuner_side.Race(
        tlopt=(result(2, 100.0, 0.70), result(3, 10.0, 0.80), result(4, 40.0, 0.50)),
        kerastuner=(result(2, 90.0, 0.75), result(3, 200.0, 0.60), result(4, 120.0, 0.65)),
    )
    assert race.speedup == pytest.approx(120.0 / 40.0)
    assert race.accuracy_delta == pytest.approx(0.70 - 0.65)
    lines = race.lines()
    assert lines[-2:] == ["kerastuner_speedup=3.00", "kerastuner_accuracy_delta=+0.050"]
    assert not any("missed" in line for line in lines), "both targets are met"
    assert lines[0].startswith("seed 2: tlopt 100 s, best 0.700; KerasTuner 90 s, best 0.750")
    row, parts = race.table_rows("the setting")
    assert "| 40 s | 120 s | 3.0x |" in row and "0.70 (tlopt) vs 0.65 (KerasTuner)" in row
    assert "| 1 s / 2 s / 37 s | 1 s / 2 s / 117 s |" in parts


def test_race_says_what_costs_the_rest_when_a_target_is_missed():
    import kerastuner_side

    race = kerastuner_side.Race(
        tlopt=(result(2, 60.0, 0.5, block=5.0, finetune=50.0), result(3, 80.0, 0.6, block=5.0, finetune=70.0)),
        kerastuner=(result(2, 90.0, 0.7, block=20.0, finetune=60.0), result(3, 110.0, 0.7, block=20.0,
                                                                          finetune=80.0)),
    )
    assert race.speedup == pytest.approx(100.0 / 70.0) and race.accuracy_delta == pytest.approx(-0.15)
    time_line, accuracy_line = race.shortfall()
    assert time_line.startswith("2x missed: tlopt would need 50 s a seed, not 70 s")
    assert "classification block 5 s vs 20 s; fine-tuning 60 s vs 70 s; rest of the search 5 s vs 10 s" in time_line
    assert accuracy_line == "accuracy missed: best val_accuracy per seed, tlopt 0.500, 0.600, KerasTuner 0.700, 0.700"
    assert race.lines()[-4:-2] == [time_line, accuracy_line]


@pytest.mark.slow
def test_kerastuner_trial_trains_the_block_frozen_then_fine_tunes_from_the_delimiting_layer_at_a_tenth(tmp_path):
    import keras

    import kerastuner_side
    from tlopt import data
    from tlopt.demo_data import generate_demo_dataset
    from tlopt.params import load_params
    from tlopt.strategies import layer_from_fraction

    root = generate_demo_dataset(tmp_path / "demo", images_per_class=4, image_size=32, num_classes=2)
    frame = data.split(data.discover(root), val_fraction=0.5)
    config = kerastuner_side.comparable(load_params(kerastuner_side.DEMO_PARAMS, {
        "results_dir": str(tmp_path), "data.batch_size": 4, "training.block_epochs": 1,
        "training.finetune_epochs": 2, "training.early_stopping_patience": 5,
    }), initial_points=1, iterations=0)
    seen = []

    class Recorder(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            base = kerastuner_side.backbone_of(self.model)
            seen.append({"trainable": [layer.trainable for layer in base.layers],
                         "rate": float(self.model.optimizer.learning_rate), "val_accuracy": []})

        def on_epoch_end(self, epoch, logs=None):
            seen[-1]["val_accuracy"].append(logs["val_accuracy"])

    tuner = kerastuner_side.make_tuner(config, 2, tmp_path / "kt")
    hypermodel = tuner.hypermodel
    names = data.class_names(frame)
    train, val = (data.make_dataset(frame[frame["split"] == split], names, 32, 4, split == "train")
                  for split in ("train", "val"))
    tuner.search(train, validation_data=val, epochs=2, callbacks=[Recorder()], verbose=0)

    (trial,) = tuner.oracle.trials.values()
    hp = trial.hyperparameters
    (finetune,) = seen  # the search's callbacks reach fine-tuning only
    layer = layer_from_fraction("VGG16", hp["delimiting_fraction"])
    assert finetune["trainable"] == [index >= layer for index in range(len(finetune["trainable"]))]
    assert finetune["rate"] == pytest.approx(hp["learning_rate"] * kerastuner_side.FINETUNE_RATE_FACTOR)
    assert trial.score == pytest.approx(max(finetune["val_accuracy"]))
    assert [(run.phase, run.epochs) for run in hypermodel.runs] == [("block", 1), ("finetune", 2)]
    block_model = hypermodel.build(hp)
    assert not any(layer.trainable for layer in kerastuner_side.backbone_of(block_model).layers)
    assert float(block_model.optimizer.learning_rate) == pytest.approx(hp["learning_rate"])
