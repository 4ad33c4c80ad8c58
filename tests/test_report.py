"""The HTML report: one offline page, notebooks in order, code folded away."""

import base64
import io
import re

import nbformat
import pytest
from matplotlib.figure import Figure

from tlopt.errors import TloptError
from tlopt.report import render_report
from tlopt.store import RunFolder


def png() -> str:
    figure = Figure(figsize=(2, 2))
    figure.subplots().plot([0, 1], [1, 0])
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode()


def executed(run_dir, name, title, source="x = 1"):
    """A notebook as papermill leaves it: a heading, a code cell with a figure, widget state."""
    notebook = nbformat.v4.new_notebook(metadata={"widgets": {"application/vnd.jupyter.widget-state+json": {}}})
    figure = nbformat.v4.new_output("display_data", data={"image/png": png(), "text/plain": "<Figure>"})
    notebook.cells = [
        nbformat.v4.new_markdown_cell(f"# {title}\n\nWhat this step does."),
        nbformat.v4.new_code_cell(source, outputs=[figure]),
    ]
    (run_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, run_dir / "notebooks" / f"{name}.ipynb")


def test_report_is_one_offline_page_with_every_notebook_in_order(tmp_path):
    run_dir = tmp_path / "demo"
    executed(run_dir, "05_analysis", "05 · Analysis", "analysis_code = 5")
    executed(run_dir, "01_shared_strategy-joint", "01 · Joint", "joint_code = 1")
    executed(run_dir, "00_data_split", "00 · Data split", "split_code = 0")
    executed(run_dir, "01_shared_strategy", "01 · Shared", "shared_code = 1")
    executed(run_dir, "04_layer_optimization-shared", "04 · Layer optimization", "layers_code = 4")

    html = render_report(run_dir).read_text()

    assert RunFolder(run_dir).report_file.is_file()
    code = [html.index(f"{name}_code") for name in ("split", "shared", "joint", "layers", "analysis")]
    assert code == sorted(code)
    for anchor in ("00_data_split", "01_shared_strategy", "01_shared_strategy-joint", "04_layer_optimization-shared",
                   "05_analysis"):
        assert f'href="#{anchor}"' in html and f'id="{anchor}"' in html
    contents = html[:html.index('id="00_data_split"')]
    assert "01 · Joint · joint" in contents and "04 · Layer optimization · shared" in contents
    assert len(re.findall(r'<img[^>]+src="data:image/png;base64,', html)) == 5
    # Nothing is fetched: no script at all, no stylesheet link, widget state ignored.
    assert "<script" not in html
    assert not re.search(r'<link[^>]+href="http', html)


def test_code_is_folded_but_present(tmp_path):
    executed(tmp_path / "run", "00_data_split", "00 · Data split", "answer = 42")
    html = render_report(tmp_path / "run").read_text()
    folded = re.search(r'<details class="tlopt-code"><summary>code</summary>(.*?)</details>', html, re.S)
    assert folded and "answer" in folded.group(1)
    assert "<details open" not in html


def test_a_run_without_executed_notebooks_is_an_error(tmp_path):
    with pytest.raises(TloptError, match="no executed notebooks"):
        render_report(tmp_path / "empty")
