"""The shape of the library: no import cycles, one registry entry per strategy, old runs resume,
no reference to files a user does not have, bench on the public API only."""

import ast
import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import REPOSITORY
from fakes import FakeTrainer
from tlopt import analysis, checks, cli, optimize
from tlopt.data import write_manifest
from tlopt.params import load_params, validate
from tlopt.space import Rate, SearchSpace
from tlopt.store import RunFolder
from tlopt.strategies import REGISTRY, Step, Strategy, shared
from tlopt.trials import Trial, best_trial

LIBRARY = REPOSITORY / "lib" / "tlopt"
OLD_RUN = Path(__file__).resolve().parent / "data" / "run-0.1.0"


def _imports(path: Path) -> set[str]:
    """The tlopt modules a module imports, anywhere in it but under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    skipped = {id(node) for branch in ast.walk(tree) if isinstance(branch, ast.If)
               and ast.unparse(branch.test) == "TYPE_CHECKING" for node in ast.walk(branch)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("tlopt.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tlopt":
            if node.module == "tlopt":
                found |= {alias.name for alias in node.names if (LIBRARY / f"{alias.name}.py").is_file()}
            else:
                found.add(node.module.split(".")[1])
    return found - {path.stem}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a list of modules, or None."""
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> list[str] | None:
        state[module] = "open"
        for imported in sorted(graph.get(module, ())):
            if state.get(imported) == "open":
                return trail[trail.index(imported):] + [imported]
            if imported not in state:
                found = visit(imported, [*trail, imported])
                if found:
                    return found
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module, [module])
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_inside_the_library():
    graph = {path.stem: _imports(path) for path in LIBRARY.glob("*.py")}
    assert graph["optimize"] >= {"bo", "store", "strategies"}, "the import graph was not read"
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def toy_space(config, basis=None) -> SearchSpace:
    """The toy searches the learning rate alone, for the first backbone and optimizer."""
    fixed = {"backbone": config.backbones[0], "optimizer": config.optimizers[0]}
    return SearchSpace([Rate("learning_rate", config.learning_rate.min, config.learning_rate.max)], fixed)


@pytest.fixture
def toy(monkeypatch):
    """A strategy of one step, registered for the test only: one entry, and notebook 01 runs it."""
    entry = Strategy("toy", "Toy: the learning rate alone", (Step("model", toy_space, shared),),
                     notebook="01_shared_strategy")
    monkeypatch.setitem(REGISTRY, "toy", entry)
    return entry


def test_a_new_strategy_is_one_registry_entry_and_runs_end_to_end(toy, tmp_path):
    params = validate({
        "run_name": "toy", "results_dir": str(tmp_path), "data": {"root": str(tmp_path / "data"), "image_size": 32},
        "backbones": ["VGG16", "VGG19"], "optimizers": ["Adam", "SGD"],
        "bo": {"initial_points": 2, "iterations": 2}, "strategies": ["shared", "toy"],
    })
    run = RunFolder.open(params)
    write_manifest(pd_manifest(), run.split_file)

    best = optimize.run_strategy(params, "toy", run, trainer=FakeTrainer(), progress=False)
    final = optimize.run_layer_optimization(params, "toy", run, trainer=FakeTrainer(), progress=False)

    assert set(best.hyperparameters) == {"backbone", "optimizer", "learning_rate"}
    assert {trial.setup["backbone"] for trial in run.trials.records()} == {"VGG16"}
    checks.check_strategy(params, run, "toy", best)
    checks.check_layer_optimization(params, run, "toy", final)
    assert analysis.finished_strategies(run) == ["toy"]
    assert analysis.strategy_summary(run).loc["toy", "final_trial"] == final.id
    names = [name for name, _, _ in cli.plan(params, params.strategies)]
    assert names == ["00_data_split", "01_shared_strategy", "01_shared_strategy-toy",
                     "04_layer_optimization-shared", "04_layer_optimization-toy", "05_analysis"]
    assert cli.parser().parse_args(["run", "p.yaml", "--strategy", "toy"]).strategy == "toy"


def pd_manifest():
    import pandas as pd

    return pd.DataFrame({"path": [f"/x/{c}{i}.jpg" for c in "ab" for i in range(3)],
                         "label": [c for c in "ab" for _ in range(3)],
                         "group": [f"{c}{i}" for c in "ab" for i in range(3)], "split": ["train", "train", "val"] * 2})


def _old_run(folder: Path) -> RunFolder:
    """The stored run of version 0.1.0, its absolute paths moved to `folder`."""
    shutil.copytree(OLD_RUN / "old", folder / "results" / "old")
    for path in (folder / "results" / "old").rglob("*"):
        if path.is_file():
            path.write_text(path.read_text().replace("__ROOT__", str(folder)))
    return RunFolder(folder / "results" / "old")


def test_a_run_made_by_the_first_version_resumes_where_it_stopped(tmp_path):
    run = _old_run(tmp_path)
    before = run.trials.records()
    params = validate(run.read_params())
    trainer = FakeTrainer()

    for strategy in ("shared", "separate_optimizations"):
        optimize.run_strategy(params, strategy, run, trainer=trainer, progress=False)
        optimize.run_layer_optimization(params, strategy, run, trainer=trainer, progress=False)

    after = run.trials.records()
    complete = [Trial.from_record(json.loads(line)) for line in (OLD_RUN / "complete-trials.jsonl").read_text()
                .replace("__ROOT__", str(tmp_path)).splitlines()]
    assert [t.to_record() for t in after[:len(before)]] == [t.to_record() for t in before], "the old records stay"
    assert {call["run_dir"].name for call in trainer.calls} == {t.id for t in after[len(before):]}, \
        "only unfinished trials ran"
    # The same suggestions and results as the first version's uninterrupted run.
    assert [(t.id, t.x, t.val_accuracy, t.setup) for t in after] == \
        [(t.id, t.x, t.val_accuracy, t.setup) for t in complete]
    layers = [t for t in complete if t.strategy == "separate_optimizations" and t.step == "layers"]
    assert run.read_best("separate_optimizations")["final"]["id"] == best_trial(layers).id


OUTSIDE = re.compile(r"SPEC\.md|DESIGN\.md|SPEC section|\.\./shared|shared/notes")


def test_nothing_cites_files_outside_the_repository():
    places = [REPOSITORY / "README.md", *(REPOSITORY / "docs").glob("*.md"), *LIBRARY.glob("*.py"),
              *(REPOSITORY / "notebooks").glob("*.ipynb"), *(REPOSITORY / "params").glob("*.yaml"),
              *(REPOSITORY / "bench").glob("*.py")]
    citing = [str(path.relative_to(REPOSITORY)) for path in places if OUTSIDE.search(path.read_text())]
    assert not citing, f"these cite files a user does not have: {citing}"


PRIVATE = re.compile(r"\b(?:tlopt\.\w+|analysis|backbones|bo|data|features|optimize|store|training)\._\w+")


def test_the_bench_uses_the_public_api_only():
    for path in (REPOSITORY / "bench").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tlopt"):
                private = [alias.name for alias in node.names if alias.name.startswith("_")]
                assert not private, f"{path.name} imports private {private} from {node.module}"
        assert not PRIVATE.search(path.read_text()), f"{path.name}: {PRIVATE.search(path.read_text()).group()}"


def test_the_method_document_has_the_sections_the_code_cites():
    method = (REPOSITORY / "docs" / "method.md").read_text()
    headings = set(re.findall(r"^##+ (\d+(?:\.\d+)?)\.? ", method, flags=re.MULTILINE))
    cited = set()
    for path in [*LIBRARY.glob("*.py"), *(REPOSITORY / "notebooks").glob("*.ipynb")]:
        for match in re.finditer(r"docs/method\.md sections? ([\d.]+)(?: and ([\d.]+))?", path.read_text()):
            cited |= {number.rstrip(".") for number in match.groups() if number}
    assert cited and cited <= headings, f"cited sections missing from docs/method.md: {sorted(cited - headings)}"


def test_the_parameter_files_name_registered_strategies():
    for path in (REPOSITORY / "params").glob("*.yaml"):
        assert set(load_params(path).strategies) <= set(REGISTRY)
