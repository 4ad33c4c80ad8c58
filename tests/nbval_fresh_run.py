"""Notebook tests (nbval): every notebook runs as it is, with its `parameters` cell defaults.

Those defaults point at params/ci.yaml, whose run folder the notebooks share in order
(00 writes the split that 01-05 read). A session that runs 00 starts that folder afresh,
so the notebooks train instead of finding a finished run to resume.
"""

import shutil
from pathlib import Path

import yaml

CI_PARAMS = Path(__file__).resolve().parent.parent / "params" / "ci.yaml"


def pytest_collection_modifyitems(items):
    if any(Path(str(item.fspath)).name == "00_data_split.ipynb" for item in items):
        settings = yaml.safe_load(CI_PARAMS.read_text())
        shutil.rmtree(CI_PARAMS.parent / settings["results_dir"] / settings["run_name"], ignore_errors=True)
