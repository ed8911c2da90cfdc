"""Fixtures for the multi-process and SLURM tests: prepared tiny data and run-config writing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("launcher_test_runs",
                                               Path(__file__).parent.parent / "launcher" / "runs.py")
runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runs)


@pytest.fixture(scope="session")
def e2e_prepared_data(tmp_path_factory, tiny_model_dir, sample_csv) -> Path:
    """The bundled sample prepared once with the tiny tokenizer (read-only for tests)."""
    return runs.prepare_tiny(tmp_path_factory.mktemp("e2e-data"), tiny_model_dir, sample_csv)


@pytest.fixture(scope="session")
def write_run(tiny_model_dir, sample_csv, e2e_prepared_data):
    """Factory: write ``folder/run.yaml`` (output in ``folder/out``) with section overrides."""

    def make(folder: Path, **sections) -> Path:
        raw = runs.run_dict(tiny_model_dir, sample_csv, e2e_prepared_data, folder / "out", **sections)
        return runs.write_run_yaml(folder / "run.yaml", raw)

    return make


# One two-node SLURM cluster for the whole session, shared by every `slurm` test module (a fixture imported
# into each module would be a separate session fixture per module: one cluster each, all alive at once).
from slurm_cluster import slurm_cluster  # noqa: E402,F401
