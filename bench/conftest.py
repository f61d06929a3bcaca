"""pytest setup for the benchmarks in bench/ (run them with `pytest bench/ --benchmark-only`;
the main test run, `pytest tests`, does not collect this folder)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper modules beside this file
