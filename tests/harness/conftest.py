import pytest


def pytest_collection_modifyitems(config, items):
    """Every test in this folder carries the `harness` marker: `pytest -m "not harness"` runs the
    product's tests alone."""
    for item in items:
        if "/tests/harness/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.harness)
