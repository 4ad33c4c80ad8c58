"""The experiment report: the run's summary, then its executed notebooks, as one self-contained HTML page.

nbconvert's `lab` template renders the page; a small template on top of it hides each
cell's code in a collapsed <details> element (the reader opens it with a click, no
script needed) and drops the <script> tags that would fetch require.js, MathJax,
Mermaid and the widget manager from a CDN, so the page reads the same offline. Figures
are already embedded in the notebooks as PNG data.
"""

from __future__ import annotations

import re
from pathlib import Path

import jinja2
import nbformat
from nbconvert import HTMLExporter

from tlopt.errors import TloptError
from tlopt.files import atomic_write_text
from tlopt.store import RunFolder
from tlopt.summary import summary_markdown

_TEMPLATE = """\
{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block extra_css -%}
<style type="text/css">
  main { max-width: 1200px; margin: 0 auto; }
  details.tlopt-code > summary { cursor: pointer; color: var(--jp-ui-font-color2); font-size: 85%; }
</style>
{%- endblock extra_css -%}
{% block input_group -%}
<details class="tlopt-code"><summary>code</summary>
{{ super() }}
</details>
{%- endblock input_group %}
"""


def executed_notebooks(run: RunFolder) -> list[Path]:
    """The run's executed notebooks in reading order (by name: 00_... to 05_...)."""
    return sorted(RunFolder(run).notebooks_dir.glob("*.ipynb"), key=lambda path: path.stem)


def _title(notebook: nbformat.NotebookNode, fallback: str) -> str:
    """The first Markdown heading of a notebook, for the table of contents."""
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            match = re.search(r"^#+\s+(.+)$", cell.source, flags=re.MULTILINE)
            if match:
                return match.group(1).strip()
    return fallback


def _label(path: Path, notebook: nbformat.NotebookNode) -> str:
    """The contents entry of a notebook: its title, and the variant its name carries (`04_...-shared`)."""
    variant = path.stem.partition("-")[2]
    title = _title(notebook, path.stem)
    return f"{title} · {variant}" if variant else title


def merged_notebook(run: RunFolder) -> nbformat.NotebookNode:
    """One notebook holding the run's summary (`tlopt.summary`), a table of contents and every executed notebook,
    each under an anchor."""
    run = RunFolder(run)
    paths = executed_notebooks(run)
    if not paths:
        raise TloptError(f"no executed notebooks in {run.notebooks_dir}: run `tlopt run` first")
    notebooks = [nbformat.read(path, as_version=4) for path in paths]
    contents = [f"- [{_label(path, nb)}](#{path.stem})" for path, nb in zip(paths, notebooks)]
    merged = nbformat.v4.new_notebook(metadata={"title": f"tlopt report: {run.name}"})
    merged.cells.append(nbformat.v4.new_markdown_cell(f"# Experiment report: {run.name}\n\nRun folder: `{run}`"))
    if run.params_file.is_file():
        merged.cells.append(nbformat.v4.new_markdown_cell(summary_markdown(run)))
    merged.cells.append(nbformat.v4.new_markdown_cell("## The notebooks\n\n" + "\n".join(contents)))
    for path, notebook in zip(paths, notebooks):
        merged.cells.append(nbformat.v4.new_markdown_cell(f'<a id="{path.stem}"></a>\n\n---\n\n`{path.name}`'))
        for index, cell in enumerate(notebook.cells):
            cell.id = f"{path.stem}-{index}"  # unique across notebooks: 01 and 04 run once per strategy
            merged.cells.append(cell)
    return merged


def render_report(run: RunFolder | str | Path) -> Path:
    """Write `<run>/report.html` from the executed notebooks; return its path."""
    run = RunFolder(run)
    exporter = HTMLExporter(
        template_name="lab",
        template_file="tlopt_report.html.j2",
        extra_loaders=[jinja2.DictLoader({"tlopt_report.html.j2": _TEMPLATE})],
        exclude_input_prompt=True,
        exclude_output_prompt=True,
    )
    body, _ = exporter.from_notebook_node(merged_notebook(run), resources={"metadata": {"name": run.name}})
    return atomic_write_text(run.report_file, body)
