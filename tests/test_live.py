"""The live figure: displayed once, redrawn in place every epoch, one curve per run."""

import keras
import numpy as np

from tlopt.live import LiveAccuracy, in_notebook


class FakeHandle:
    def __init__(self):
        self.updates = []

    def update(self, figure):
        self.updates.append(figure)


class FakeDisplay:
    def __init__(self):
        self.calls = []
        self.handle = FakeHandle()

    def __call__(self, figure, display_id=False):
        assert display_id is True, "an updatable display needs a display id"
        self.calls.append(figure)
        return self.handle


def tiny_fit(callback, epochs):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 4)), rng.integers(0, 2, size=32)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, validation_data=(x, y), epochs=epochs, verbose=0, callbacks=[callback])


def test_one_output_updated_every_epoch_for_every_run():
    display = FakeDisplay()
    live = LiveAccuracy("shared", display=display)
    live.trial_begin(None, "shared-model-000")
    tiny_fit(live, epochs=3)
    tiny_fit(live, epochs=2)
    live.trial_begin(None, "shared-model-001")
    tiny_fit(live, epochs=2)
    assert len(display.calls) == 1
    assert len(display.handle.updates) == 3 + 2 + 2 - 1
    assert [label for label, _ in live.curves] == [
        "shared-model-000 run 1", "shared-model-000 run 2", "shared-model-001 run 1"
    ]
    assert [len(values) for _, values in live.curves] == [3, 2, 2]
    axis = display.handle.updates[-1].axes[0]
    assert len(axis.lines) == 3
    assert axis.get_legend().get_texts()[0].get_text() == "shared-model-001 run 1"


def test_outside_a_kernel_there_is_no_live_figure():
    assert in_notebook() is False
