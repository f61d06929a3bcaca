"""pytest setup for the benchmarks in bench/ (run them with `pytest bench/ --benchmark-only`;
the main test run, `pytest tests`, does not collect this folder)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper modules beside this file

try:
    import pytest_benchmark  # noqa: F401
except ImportError:  # without the plugin each case still runs once, as a smoke test

    @pytest.fixture
    def benchmark():
        def run_once(function, *args, **kwargs):
            return function(*args, **kwargs)

        return run_once
