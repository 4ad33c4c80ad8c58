"""JupyterLab in a real browser: the bounds panel saves a parameter file, a search shows live feedback.

Playwright drives Debian's Chromium (`.ci/run` installs it with apt; Playwright's own browser
download is never used) against a JupyterLab started for this test alone: token-less, on
127.0.0.1, on a free port, with fresh configuration folders, serving a temporary copy of the
notebooks, so that nothing in the repository changes.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from playwright.sync_api import expect, sync_playwright

from tlopt.cli import execute
from tlopt.params import dump_params, load_params

REPOSITORY = Path(__file__).resolve().parent.parent
NOTEBOOK = "01_shared_strategy.ipynb"
KERNEL = "tlopt"  # the project's environment as a Jupyter kernel (`make setup`), which the notebooks name
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(420),
    pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                       reason=f"no Chromium at {CHROMIUM}: .ci/run installs it with `apt-get install -y chromium`"),
]
# Without the background-networking switches Chromium's own connections (updates, sync,
# field trials) are refused on a machine without internet, and page loads stall.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The panel's changes: a new run name, so the edited experiment gets its own run folder, a
# lower learning-rate upper bound, and a backbone that the tiny parameter file does not list.
EDITED = {"run_name": "browser", "learning_rate.max": 0.01, "backbones": ["MobileNetV3SmallMinimalistic"]}
KERNEL_TIMEOUT_MS = 180_000  # importing TensorFlow or a search of two trials, on 2 busy cores


@pytest.fixture
def workspace(tmp_path):
    """A copy of the notebooks whose 01 reads a tiny parameter file: ci.yaml's data, 2 trials of
    2 + 2 epochs (no nonconvergence stop, so that the live figure is redrawn 8 times)."""
    shutil.copytree(REPOSITORY / "notebooks", tmp_path / "notebooks")
    params = load_params(REPOSITORY / "params" / "ci.yaml", {
        "results_dir": str(tmp_path / "results"), "data.root": str(tmp_path / "data"), "run_name": "tiny",
        "strategies": ["shared"], "layer_optimization.enabled": False,
        "training.block_epochs": 2, "training.finetune_epochs": 2, "training.nonconvergence.enabled": False,
        "bo.initial_points": 2, "bo.iterations": 0,
    })
    tiny = dump_params(params, tmp_path / "tiny.yaml")
    path = tmp_path / "notebooks" / NOTEBOOK
    notebook = nbformat.read(path, as_version=4)
    [cell] = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    cell.source = re.sub(r"^params_file = .*$", f"params_file = {str(tiny)!r}", cell.source, flags=re.MULTILINE)
    nbformat.write(notebook, path)
    return tmp_path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_lab_settings(config_dir: Path) -> None:
    """No news toast over the notebook; every cell in the DOM, even the ones scrolled away."""
    settings = config_dir / "lab" / "user-settings" / "@jupyterlab"
    for plugin, values in (("apputils-extension/notification", {"fetchNews": "false", "checkForUpdates": False}),
                           ("notebook-extension/tracker", {"windowingMode": "none"})):
        path = settings / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


@pytest.fixture
def lab(workspace):
    """JupyterLab serving the workspace; its URL. Kernel specs of this environment stay reachable
    (sys.prefix/share/jupyter), every configuration and runtime folder is new."""
    port = free_port()
    jupyter = workspace / "jupyter"
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(jupyter / "config"), "JUPYTER_DATA_DIR": str(jupyter / "data"),
           "JUPYTER_RUNTIME_DIR": str(jupyter / "runtime"), "IPYTHONDIR": str(jupyter / "ipython")}
    write_lab_settings(jupyter / "config")
    log = (workspace / "jupyterlab.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",  # CI runs as root
         "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
         "--ServerApp.token=", "--ServerApp.password=", "--ServerApp.disable_check_xsrf=True",
         f"--ServerApp.root_dir={workspace}", "--LabApp.news_url=None", "--LabApp.extension_manager=readonly",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, f"JupyterLab exited: {(workspace / 'jupyterlab.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "JupyterLab did not answer within 90 s"
            try:
                with urllib.request.urlopen(f"{url}/api/status", timeout=5):
                    break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        # /api/shutdown stops the kernels too; terminate only what does not stop by itself.
        try:
            urllib.request.urlopen(urllib.request.Request(f"{url}/api/shutdown", method="POST"), timeout=10)
            server.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            server.terminate()
            server.wait(timeout=30)
        log.close()


@pytest.fixture
def page(lab):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        yield page
        browser.close()


def cell_index(notebook: nbformat.NotebookNode, code: str) -> int:
    """The first code cell whose source holds `code`: cells are found by what they do, not by position."""
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code" and code in cell.source:
            return index
    raise AssertionError(f"{NOTEBOOK} has no code cell with {code!r}")


def run_cells(page, notebook: nbformat.NotebookNode, first: int, last: int) -> None:
    """Select cell `first` and press Shift+Enter through cell `last`, as a user does; wait until
    the kernel has run them all, and fail with its traceback if one of them raised."""
    cells = page.locator(".jp-Notebook .jp-Cell")
    cells.nth(first).locator(".jp-InputPrompt").click()
    for _ in range(first, last + 1):
        page.keyboard.press("Shift+Enter")
    code = [index for index in range(first, last + 1) if notebook.cells[index].cell_type == "code"]
    # A queued cell shows [*]; an error aborts the cells queued after it, which then show [ ].
    page.wait_for_function(
        """(code) => {
            const cells = document.querySelectorAll('.jp-Notebook .jp-Cell');
            const prompts = code.map(i => cells[i].querySelector('.jp-InputPrompt').textContent);
            return !prompts.some(p => p.includes('*')) && /\\[\\d+\\]/.test(prompts[0]);
        }""",
        arg=code, timeout=KERNEL_TIMEOUT_MS,
    )
    for index in code:
        output = cells.nth(index).locator(".jp-OutputArea").inner_text()
        assert "Traceback (most recent call last)" not in output, f"cell {index} raised:\n{output[-3000:]}"
        prompt = cells.nth(index).locator(".jp-InputPrompt").inner_text()
        assert re.search(r"\[\d+\]", prompt), f"cell {index} did not run"


def change_and_save(panel) -> Path:
    """Edit the panel's widgets like a user, press Save; the path the panel says it wrote."""
    panel.get_by_label("run_name", exact=True).fill(EDITED["run_name"])
    rate = panel.get_by_label("learning_rate.max", exact=True)
    rate.fill(str(EDITED["learning_rate.max"]))
    rate.press("Tab")  # a FloatText sends its value on change, i.e. when it loses focus
    panel.get_by_label("backbones", exact=True).select_option(EDITED["backbones"])
    panel.get_by_role("button", name=re.compile(r"^Save")).click()
    status = panel.get_by_text(re.compile(r"^(Saved|Not saved)"))
    status.wait_for()
    message = status.inner_text()
    assert message.startswith("Saved "), message
    return Path(re.search(r"^Saved (\S+\.yaml)", message).group(1))


def test_panel_saves_a_parameter_file_and_the_search_shows_live_feedback(workspace, lab, page):
    notebook = nbformat.read(workspace / "notebooks" / NOTEBOOK, as_version=4)
    assert notebook.metadata.kernelspec.name == KERNEL, f"{NOTEBOOK} does not name the project's kernel"
    with urllib.request.urlopen(f"{lab}/api/kernelspecs") as response:
        kernels = json.load(response)["kernelspecs"]
    assert KERNEL in kernels, f"no Jupyter kernel '{KERNEL}' in {sys.prefix}: run `make setup`"
    kernel_ready = re.escape(f"{kernels[KERNEL]['spec']['display_name']} | Idle")  # the status bar
    panel_cell = cell_index(notebook, "bounds_panel(")
    search_cell = cell_index(notebook, "run_strategy(")
    figure_cell = cell_index(notebook, "accuracy_by_epoch_figure(")
    cells = page.locator(".jp-Notebook .jp-Cell")

    page.goto(f"{lab}/lab/tree/notebooks/{NOTEBOOK}")
    page.get_by_text(re.compile(f"^{kernel_ready}$")).wait_for(timeout=KERNEL_TIMEOUT_MS)
    expect(cells).to_have_count(len(notebook.cells))

    # The panel: run the cells up to it, change two bounds and the run name, Save.
    run_cells(page, notebook, 0, panel_cell)
    panel = cells.nth(panel_cell).locator(".jp-OutputArea")
    saved = change_and_save(panel)
    cells.nth(panel_cell).screenshot(path=workspace / "panel.png")
    assert saved == workspace / "tiny_edited.yaml", "the edited file goes next to the one it edits"
    edited = load_params(saved)
    assert edited.run_name == EDITED["run_name"] and edited.backbones == EDITED["backbones"]
    original = load_params(workspace / "tiny.yaml")
    assert edited.learning_rate == original.learning_rate.model_copy(update={"max": EDITED["learning_rate.max"]})

    # 01 searches on the split that 00 writes: run 00 on the saved file, as `tlopt run` would.
    execute(workspace / "notebooks" / "00_data_split.ipynb", workspace / "00_data_split.ipynb",
            {"params_file": str(saved), "interactive": False})

    # The search and the rest of the notebook, with the saved file.
    run_cells(page, notebook, panel_cell + 1, len(notebook.cells) - 1)
    search = cells.nth(search_cell).locator(".jp-OutputArea")
    search.scroll_into_view_if_needed()
    page.screenshot(path=workspace / "search.png")

    progress = search.locator(".widget-hbox", has=page.locator(".widget-hprogress"))
    assert progress.count() == 1, "one tqdm bar over the trials of the step"
    bar = " ".join(progress.inner_text().split())  # tqdm pads with figure spaces
    assert re.search(r"2/2 .*best val_accuracy=\d\.\d{3}", bar), bar
    images = search.locator(".jp-OutputArea-output img")
    assert images.count() == 1, "the live figure is one output updated in place, not one per epoch"
    for image in (images.first, cells.nth(figure_cell).locator(".jp-OutputArea-output img").first):
        assert image.evaluate("img => img.complete && img.naturalWidth > 0"), "a figure did not render"

    # The cells below the panel ran with the saved file: its run folder, its bounds.
    trials = (workspace / "results" / EDITED["run_name"] / "trials.jsonl").read_text().splitlines()
    chosen = [json.loads(line)["hyperparameters"] for line in trials]
    assert len(chosen) == 2
    assert {hparams["backbone"] for hparams in chosen} == set(EDITED["backbones"])
    assert all(hparams["learning_rate"] <= EDITED["learning_rate.max"] for hparams in chosen)
