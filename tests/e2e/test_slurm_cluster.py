"""The local SLURM cluster itself: two nodes answer an srun."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slurm


def test_srun_hostname_runs_on_both_nodes(slurm_cluster):
    res = slurm_cluster.run("srun", "-N2", "-n2", "--label", "bash", "-c", "echo $SLURMD_NODENAME")
    names = sorted(line.split(":", 1)[1].strip() for line in res.stdout.splitlines())
    assert names == ["n1", "n2"]
