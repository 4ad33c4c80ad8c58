"""The widget panel of the notebooks: edits bounds, saves a validated file; headless, shows only."""

import pytest

from tlopt.errors import ConfigError
from tlopt.panel import PANEL_KEYS, bounds_panel
from tlopt.params import load_params


@pytest.fixture
def params_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("run_name: base\ndata: {root: images}\n")
    return path


def test_save_writes_the_edited_values_as_a_new_valid_parameter_file(tmp_path, params_file):
    panel = bounds_panel(params_file)
    assert panel.params_file == params_file
    panel.widgets["run_name"].value = "fewer"
    panel.widgets["backbones"].value = ("VGG16", "MobileNetV3Small")
    panel.widgets["optimizers"].value = ("Adam",)
    panel.widgets["learning_rate.min"].value = 0.001
    panel.widgets["bo.iterations"].value = 4
    panel.widgets["training.nonconvergence.enabled"].value = False

    saved = panel.save()

    assert saved == panel.saved_path == panel.params_file == tmp_path / "exp_edited.yaml"
    edited = load_params(saved)
    assert edited.run_name == "fewer"
    assert edited.backbones == ["VGG16", "MobileNetV3Small"] and edited.optimizers == ["Adam"]
    assert edited.learning_rate.min == 0.001 and edited.bo.iterations == 4
    assert edited.training.nonconvergence.enabled is False
    assert edited.data == load_params(params_file).data, "what the panel does not show is kept"
    assert edited.data.root == str(tmp_path / "images")
    assert load_params(params_file).bo.iterations == 10, "the original file is not changed"


def test_invalid_values_are_not_saved(tmp_path, params_file):
    panel = bounds_panel(params_file, save_to=tmp_path / "elsewhere.yaml")
    panel.widgets["learning_rate.min"].value = 2.0  # above max
    with pytest.raises(ConfigError, match="min must be below max"):
        panel.save()
    assert not (tmp_path / "elsewhere.yaml").exists() and panel.saved_path is None
    assert panel.params_file == params_file


def test_the_save_button_reports_errors_in_the_panel(tmp_path, params_file):
    import ipywidgets

    panel = bounds_panel(params_file)
    status = ipywidgets.Label()
    panel.widgets["optimizers"].value = ()
    panel._on_save(status)
    assert status.value.startswith("Not saved:") and "optimizers" in status.value
    panel.widgets["optimizers"].value = ("SGD",)
    panel._on_save(status)
    assert status.value.startswith(f"Saved {tmp_path / 'exp_edited.yaml'} ")
    assert load_params(tmp_path / "exp_edited.yaml").optimizers == ["SGD"]


def test_headless_the_panel_shows_the_values_and_changes_nothing(tmp_path, params_file):
    panel = bounds_panel(params_file, interactive=False)
    assert panel.widgets == {} and panel.params_file == params_file
    assert panel.values()["bo.initial_points"] == 5 and list(panel.values()) == list(PANEL_KEYS)
    with pytest.raises(ConfigError, match="headless"):
        panel.save()
    assert not (tmp_path / "exp_edited.yaml").exists()


def displayed(thing) -> list[dict]:
    """What IPython would send to the notebook for `display(thing)`: one mime bundle per output."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.display import display
    from IPython.utils.capture import capture_output

    InteractiveShell.instance()
    with capture_output() as captured:
        display(thing)
    return [output.data for output in captured.outputs]


def test_headless_display_is_a_table_not_a_widget(params_file):
    panel = bounds_panel(params_file, interactive=False)
    [bundle] = displayed(panel)
    assert "application/vnd.jupyter.widget-view+json" not in bundle
    assert "<table" in bundle["text/html"]
    assert all(key in bundle["text/html"] for key in PANEL_KEYS)


def test_interactive_display_is_the_widget_box(params_file):
    panel = bounds_panel(params_file)
    [bundle] = displayed(panel)
    assert "application/vnd.jupyter.widget-view+json" in bundle
