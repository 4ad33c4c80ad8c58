"""`make test` runs the suite in two processes: the groups that tests/conftest.py gives must reach
pytest-xdist's scheduler, or the notebooks' cells would run in fresh kernels; the longest groups go first."""

import os

import pytest


@pytest.mark.skipif("PYTEST_XDIST_WORKER" not in os.environ, reason="only under pytest-xdist (make test)")
def test_the_modules_group_reaches_the_scheduler(request):
    assert request.node.nodeid.endswith("@test_suite_grouping.py"), request.node.nodeid


def test_the_longest_groups_are_handed_out_first_and_each_group_keeps_its_order():
    import conftest

    class Item:
        def __init__(self, path: str):
            self.fspath, self.groups = path, []

        def add_marker(self, marker):
            self.groups.append(marker.args[0])

    names = ["tests/test_params.py", "notebooks/00_data_split.ipynb", "tests/test_ray_cli.py", "tests/test_e2e.py",
             "notebooks/01_shared_strategy.ipynb", "tests/test_ray.py", "tests/test_space.py"]
    items = [Item(f"/repo/{name}") for name in names]
    conftest.pytest_collection_modifyitems(items)
    assert [(item.fspath.rsplit("/", 1)[1], item.groups) for item in items] == [
        ("test_ray_cli.py", ["ray"]), ("test_ray.py", ["ray"]), ("test_e2e.py", ["finished_run"]),
        ("00_data_split.ipynb", ["notebooks"]), ("01_shared_strategy.ipynb", ["notebooks"]),
        ("test_params.py", ["test_params.py"]), ("test_space.py", ["test_space.py"]),
    ]
