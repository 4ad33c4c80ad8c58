"""`tlopt run` and `tlopt report`: what runs in which order, and one line per user error."""

import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest

from tlopt import cli
from tlopt.params import validate
from tlopt.strategies import REGISTRY

TLOPT = Path(sys.executable).parent / "tlopt"


def params_file(tmp_path, extra=""):
    path = tmp_path / "exp.yaml"
    path.write_text(textwrap.dedent("""\
        run_name: exp
        results_dir: results
        data: {root: data, image_size: 32}
        backbones: [MobileNetV3Small]
        weights: null
        """) + extra)
    return path


def run_cli(capsys, *argv):
    code = cli.main(["run", *map(str, argv)])
    return code, capsys.readouterr().err.strip().splitlines()


def test_an_existing_name_is_refused(tmp_path, capsys):
    (tmp_path / "results" / "taken").mkdir(parents=True)
    code, err = run_cli(capsys, params_file(tmp_path), "--name", "taken")
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and "already exists" in err[0]


def test_the_default_name_comes_from_run_name_and_is_refused_too(tmp_path, capsys):
    (tmp_path / "results" / "exp").mkdir(parents=True)
    code, err = run_cli(capsys, params_file(tmp_path))
    assert code == 2 and "results/exp already exists" in err[0]


def test_resuming_a_missing_run_is_refused(tmp_path, capsys):
    code, err = run_cli(capsys, params_file(tmp_path), "--resume", tmp_path / "results" / "never")
    assert code == 2
    assert err == [f"error: cannot resume {tmp_path / 'results' / 'never'}: not a run folder (no params.yaml)"]


@pytest.mark.parametrize("extra, message", [
    ("colour: blue\n", "unknown key 'colour'"),
    ("bo: {initial_points: 0}\n", "bo.initial_points"),
    ("backbones: [NoSuchNet]\n", "unknown backbone 'NoSuchNet'"),
])
def test_a_bad_parameter_file_is_one_line(tmp_path, capsys, extra, message):
    path = params_file(tmp_path)
    path.write_text(path.read_text().replace("backbones: [MobileNetV3Small]\n", "") + extra)
    code, err = run_cli(capsys, path)
    assert code == 2 and len(err) == 1 and message in err[0]


def test_replace_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    folder = tmp_path / "results" / "exp"
    folder.mkdir(parents=True)
    (folder / "thesis.tex").write_text("precious")
    code, err = run_cli(capsys, params_file(tmp_path), "--replace")
    assert code == 2 and "not a tlopt run folder" in err[0]
    assert (folder / "thesis.tex").is_file()


def test_a_run_folder_in_use_by_another_run_is_refused(tmp_path, capsys):
    import fcntl

    (tmp_path / "results").mkdir()
    with open(tmp_path / "results" / ".exp.lock", "w") as other_run:
        fcntl.flock(other_run, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, err = run_cli(capsys, params_file(tmp_path), "--replace")
    assert code == 2 and err == [f"error: {tmp_path / 'results' / 'exp'} is in use by another `tlopt run`"]


def test_name_and_resume_exclude_each_other(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", str(params_file(tmp_path)), "--name", "a", "--resume", "b"])
    assert exit_info.value.code == 2


def test_the_console_script_prints_one_line_and_no_traceback(tmp_path):
    result = subprocess.run([str(TLOPT), "run", str(tmp_path / "missing.yaml")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: parameter file not found: {tmp_path / 'missing.yaml'}"


def test_plan_runs_each_strategy_then_its_layer_optimization_then_the_analysis(tmp_path):
    params = validate({"data": {"root": str(tmp_path)}})
    steps = cli.plan(params, ["shared", "joint", "separate_optimizations"])
    assert [name for name, _, _ in steps] == [
        "00_data_split", "01_shared_strategy", "01_shared_strategy-joint", "03_separate_optimizations",
        "04_layer_optimization-shared", "04_layer_optimization-joint", "04_layer_optimization-separate_optimizations",
        "05_analysis",
    ]
    parameters = {name: extra for name, _, extra in steps}
    assert parameters["01_shared_strategy-joint"] == {"strategy": "joint", "interactive": False}
    assert parameters["03_separate_optimizations"] == {"strategy": "separate_optimizations", "interactive": False}
    assert parameters["04_layer_optimization-joint"] == {"strategy": "joint", "interactive": False}
    assert parameters["05_analysis"] == {}
    assert {source for _, source, _ in steps} <= {path.stem for path in cli.SOURCE_NOTEBOOKS.glob("*.ipynb")}


def test_plan_without_layer_optimization(tmp_path):
    params = validate({"data": {"root": str(tmp_path)}, "layer_optimization": {"enabled": False}})
    assert [name for name, _, _ in cli.plan(params, ["shared"])] == ["00_data_split", "01_shared_strategy", "05_analysis"]


def test_every_registered_strategy_names_a_notebook_that_takes_it_as_a_parameter():
    import nbformat

    for name, entry in REGISTRY.items():
        notebook = nbformat.read(cli.SOURCE_NOTEBOOKS / f"{entry.notebook}.ipynb", as_version=4)
        [parameters] = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
        assert "\nstrategy = " in f"\n{parameters.source}", f"{entry.notebook} has no strategy parameter"


def test_finished_means_executed_to_the_end_without_error(tmp_path):
    path = tmp_path / "00.ipynb"
    assert not cli.finished(path)
    for metadata, expected in [
        ({"end_time": "2026-01-01T00:00:00", "exception": False}, True),
        ({"end_time": "2026-01-01T00:00:00", "exception": True}, False),
        ({"end_time": None, "exception": None}, False),
    ]:
        nbformat.write(nbformat.v4.new_notebook(metadata={"papermill": metadata}), path)
        assert cli.finished(path) is expected


@pytest.mark.parametrize("visible, count, expected", [(None, 0, ""), (None, 2, "0,1"), ("3,5,7", 1, "3")])
def test_gpus_restricts_the_visible_devices(monkeypatch, visible, count, expected):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    cli.restrict_gpus(count)
    assert cli.os.environ["CUDA_VISIBLE_DEVICES"] == expected


def test_the_kernel_must_be_this_interpreter(monkeypatch):
    from jupyter_client.kernelspec import KernelSpecManager

    cli.check_kernel()  # this environment's own python3 kernel
    monkeypatch.setattr(KernelSpecManager, "get_kernel_spec",
                        lambda self, name: SimpleNamespace(argv=["/opt/other/bin/python", "-m", "ipykernel"]))
    with pytest.raises(cli.TloptError, match="runs /opt/other/bin/python"):
        cli.check_kernel()
