"""Fixtures for launcher tests: prepared tiny data and a run-config factory."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("launcher_test_runs", Path(__file__).with_name("runs.py"))
runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runs)


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory, tiny_model_dir, sample_csv) -> Path:
    """The bundled sample prepared once with the tiny tokenizer (read-only for tests)."""
    return runs.prepare_tiny(tmp_path_factory.mktemp("launch-data"), tiny_model_dir, sample_csv)


@pytest.fixture()
def make_run(tmp_path, tiny_model_dir, sample_csv, prepared_data):
    """Factory: write a run YAML under tmp_path with section overrides; returns its path."""

    def make(name: str = "run", **sections) -> Path:
        raw = runs.run_dict(tiny_model_dir, sample_csv, prepared_data, tmp_path / name / "out", **sections)
        return runs.write_run_yaml(tmp_path / name / "run.yaml", raw)

    return make
