"""`make test` runs the suite in two processes: the groups that tests/conftest.py gives must reach
pytest-xdist's scheduler, or the notebooks' cells would run in fresh kernels."""

import os

import pytest


@pytest.mark.skipif("PYTEST_XDIST_WORKER" not in os.environ, reason="only under pytest-xdist (make test)")
def test_the_modules_group_reaches_the_scheduler(request):
    assert request.node.nodeid.endswith("@test_suite_grouping.py"), request.node.nodeid
