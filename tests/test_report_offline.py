"""The HTML report reads offline: a browser opening it fetches no script, style, font or image.

The check reads the page as a browser would: every `src`, every `<link href>`, and every
`url(...)`/`@import` of its styles must be inline (`data:`) or an anchor in the page itself.
"""

import re
from html.parser import HTMLParser

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPOSITORY
from tlopt.report import render_report

CSS_COMMENT = re.compile(r"/\*.*?\*/", re.DOTALL)
CSS_URL = re.compile(r"""@import\s+['"]([^'"]+)['"]|url\(\s*['"]?([^'")\s]+)""")


def css_urls(css: str) -> list[str]:
    return [imported or url for imported, url in CSS_URL.findall(CSS_COMMENT.sub("", css))]


class _Loads(HTMLParser):
    """What a page loads by itself (links a reader clicks, `<a href>`, are not loads)."""

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []
        self.in_style = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.urls += [attrs[name] for name in ("src", "poster") if attrs.get(name)]
        if tag == "link" and attrs.get("href"):
            self.urls.append(attrs["href"])
        if tag == "object" and attrs.get("data"):
            self.urls.append(attrs["data"])
        self.urls += css_urls(attrs.get("style") or "")
        self.in_style = tag == "style"

    def handle_endtag(self, tag):
        self.in_style = False

    def handle_data(self, data):
        if self.in_style:
            self.urls += css_urls(data)


def fetched_urls(html: str) -> list[str]:
    """The URLs a browser would fetch to show the page: all but inline data and in-page anchors."""
    parser = _Loads()
    parser.feed(html)
    return [url for url in parser.urls if not url.startswith(("data:", "#"))]


def test_the_check_finds_every_kind_of_fetch():
    html = """<html><head>
      <script src="https://cdn.example/require.js"></script>
      <link rel="stylesheet" href="https://cdn.example/lab.css">
      <style>/* url(https://in.a/comment) */ @import "https://fonts.example/css";
        @font-face { src: url('https://fonts.example/a.woff2'); }
        .icon { background: url(data:image/svg+xml;base64,AAAA); }</style>
    </head><body>
      <img src="figure.png"><img src="data:image/png;base64,AAAA">
      <div style="background-image: url(https://img.example/b.png)"></div>
      <a href="https://example.org">a link</a> <a href="#section">an anchor</a>
    </body></html>"""
    assert fetched_urls(html) == [
        "https://cdn.example/require.js", "https://cdn.example/lab.css", "https://fonts.example/css",
        "https://fonts.example/a.woff2", "figure.png", "https://img.example/b.png",
    ]


@pytest.mark.slow
def test_the_report_of_a_run_fetches_nothing(finished_run):
    """The report of a real `tlopt run` (tests/conftest.py): its tables, figures and styles."""
    run_dir, _ = finished_run
    html = (run_dir / "report.html").read_text()

    assert fetched_urls(html) == []
    assert "<script" not in html
    assert len(re.findall(r'<img[^>]+src="data:image/png;base64,', html)) >= 5, "the figures are inline"


def test_widget_outputs_are_static_in_the_report(tmp_path):
    """Notebooks executed with widgets (the bounds panel, a tqdm bar) keep widget views and state;
    the report shows their text instead of loading a widget manager."""
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_markdown_cell("# Widgets"),
        nbformat.v4.new_code_cell("from tqdm.auto import tqdm\nfor _ in tqdm(range(3), desc='trials'):\n    pass"),
        nbformat.v4.new_code_cell(
            "from tlopt.panel import bounds_panel\n"
            f"bounds_panel({str(REPOSITORY / 'params' / 'ci.yaml')!r}, save_to={str(tmp_path / 'edited.yaml')!r})"
        ),
    ]
    NotebookClient(notebook, kernel_name="python3", store_widget_state=True).execute()
    widget_outputs = [output for cell in notebook.cells[1:] for output in cell.outputs
                      if "application/vnd.jupyter.widget-view+json" in output.get("data", {})]
    assert len(widget_outputs) == 2 and notebook.metadata.widgets, "the notebook holds widget views and state"
    (tmp_path / "run" / "notebooks").mkdir(parents=True)
    nbformat.write(notebook, tmp_path / "run" / "notebooks" / "00_widgets.ipynb")

    html = render_report(tmp_path / "run").read_text()

    assert fetched_urls(html) == []
    assert "<script" not in html, "no widget manager, no widget state script"
    assert "trials:" in html and "VBox(" in html, "each widget shows its text"
