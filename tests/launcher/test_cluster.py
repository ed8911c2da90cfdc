"""Nodelist parsing, hostfiles, SLURM variables and host checks, without a cluster."""

from __future__ import annotations

import socket
import subprocess

import pytest

from launcher.cluster import (Cluster, ClusterError, Host, build_hostfile, check_hosts, discover,
                              expand_nodelist, parse_hostfile, slurm_hosts, slurm_rank_env)


@pytest.mark.parametrize("nodelist, hosts", [
    ("n1", ["n1"]),
    ("n[1-3,7]", ["n1", "n2", "n3", "n7"]),
    ("gpu-a[01-04]", ["gpu-a01", "gpu-a02", "gpu-a03", "gpu-a04"]),
    ("a[1-2],b3", ["a1", "a2", "b3"]),
    ("node[098-101]", ["node098", "node099", "node100", "node101"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("x,y[3],z[10-11]", ["x", "y3", "z10", "z11"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["n[1-3", "n1-3]", "n[3-1]", "n[a-b]", ""])
def test_expand_nodelist_rejects_malformed(bad):
    with pytest.raises(ClusterError):
        expand_nodelist(bad)


def test_expand_nodelist_matches_scontrol_when_present(tmp_path):
    import os
    import shutil

    if not shutil.which("scontrol"):
        pytest.skip("scontrol not installed")
    # `scontrol show hostnames` only needs some config to start; it never contacts a controller.
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=t\nSlurmctldHost=localhost\nNodeName=x\nPartitionName=p Nodes=x\n")
    nodelist = "gpu-a[01-03,10],b[7-8],c"
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                         env={**os.environ, "SLURM_CONF": str(conf)})
    assert out.returncode == 0, out.stderr
    assert expand_nodelist(nodelist) == out.stdout.split()


def test_hostfile_round_trip():
    hosts = [Host("n1", 8), Host("n2", 4)]
    text = build_hostfile(hosts)
    assert text == "n1 slots=8\nn2 slots=4\n"
    assert parse_hostfile("# cluster\n" + text + "\n") == hosts


@pytest.mark.parametrize("text, where", [
    ("n1 slots=8\nn2 slot=4\n", "hf:2"),
    ("n1 slots=0\n", "hf:1"),
    ("n1 slots=2\nn1 slots=2\n", "hf:2"),
    ("# nothing\n", "no hosts"),
])
def test_hostfile_errors_name_the_line(text, where):
    with pytest.raises(ClusterError, match=where):
        parse_hostfile(text, source="hf")


def test_slurm_hosts_and_rank_env():
    env = {"SLURM_JOB_NODELIST": "gpu-a[01-02]", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NTASKS": "8",
           "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}
    assert slurm_hosts(env) == [Host("gpu-a01", 4), Host("gpu-a02", 4)]
    ranks = slurm_rank_env(env, master_port=1234)
    assert ranks == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_SIZE": "4",
                     "MASTER_ADDR": "gpu-a01", "MASTER_PORT": "1234"}


def test_slurm_tasks_per_node_with_repeat_syntax():
    env = {"SLURM_JOB_NODELIST": "n[1-3]", "SLURM_NTASKS_PER_NODE": "2(x3)"}
    assert [h.slots for h in slurm_hosts(env)] == [2, 2, 2]


def test_slurm_rank_env_outside_a_task():
    with pytest.raises(ClusterError, match="SLURM_PROCID"):
        slurm_rank_env({"SLURM_JOB_NODELIST": "n1"})


def test_discover_sources(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("localhost slots=2\n")
    c = discover(hostfile=str(hf), env={})
    assert (c.source, c.world_size, c.master_addr) == ("hostfile", 2, "127.0.0.1")
    c = discover(env={"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NTASKS_PER_NODE": "1"})
    assert (c.source, c.world_size, c.master_addr, c.num_nodes) == ("slurm", 2, "n1", 2)
    c = discover(num_gpus=3, env={})
    assert (c.source, c.world_size) == ("local", 3)
    with pytest.raises(ClusterError, match="cannot read"):
        discover(hostfile=str(tmp_path / "missing"), env={})


def test_check_hosts_unresolvable_host_is_one_clear_error():
    cluster = Cluster([Host("localhost", 1), Host("no-such-host.invalid", 2)], "hostfile", hostfile="hf")

    def resolve(name, port):
        if name.endswith(".invalid"):
            raise socket.gaierror(-2, "Name or service not known")
        return [(socket.AF_INET, 0, 0, "", ("127.0.0.1", 0))]

    with pytest.raises(ClusterError, match=r"in hf: host no-such-host\.invalid does not resolve"):
        check_hosts(cluster, resolve=resolve)


def test_check_hosts_real_resolver_rejects_unknown_name():
    cluster = Cluster([Host("zerotune-no-such-host.invalid", 1)], "hostfile")
    with pytest.raises(ClusterError, match="does not resolve"):
        check_hosts(cluster)


def test_check_hosts_remote_ssh_failure_and_gpu_mismatch():
    cluster = Cluster([Host("remote-a", 8), Host("remote-b", 8)], "hostfile")

    def resolve(name, port):
        return [(socket.AF_INET, 0, 0, "", ("10.0.0.9", 0))]

    def run(cmd, **kwargs):
        host = cmd[cmd.index("remote-a") if "remote-a" in cmd else cmd.index("remote-b")]
        if host == "remote-a":
            return subprocess.CompletedProcess(cmd, 255, "", "ssh: connect to host remote-a: Connection timed out")
        return subprocess.CompletedProcess(cmd, 0, "4\n", "")

    with pytest.raises(ClusterError) as err:
        check_hosts(cluster, resolve=resolve, run=run)
    msg = str(err.value)
    assert "remote-a does not answer ssh" in msg and "timed out" in msg
    assert "remote-b: slots=8 but it has 4 GPU(s)" in msg


def _hostfile(tmp_path, names):
    hf = tmp_path / "hostfile"
    hf.write_text("".join(f"{n} slots=1\n" for n in names))
    return str(hf)


def test_multi_host_rendezvous_is_never_loopback_when_launched_on_the_first_host(tmp_path):
    # Launched on node 1 itself, the normal case: its own name must be what the other hosts are given.
    me = socket.gethostname()
    c = discover(hostfile=_hostfile(tmp_path, [me, "node-2.example"]), env={})
    assert c.master_addr == me
    c = discover(hostfile=_hostfile(tmp_path, ["node-1.example", me]), env={})
    assert c.master_addr == "node-1.example"


def test_single_local_host_keeps_loopback(tmp_path):
    assert discover(hostfile=_hostfile(tmp_path, [socket.gethostname()]), env={}).master_addr == "127.0.0.1"
    assert discover(hostfile=_hostfile(tmp_path, ["localhost"]), env={}).master_addr == "127.0.0.1"


def test_multi_host_first_host_written_as_localhost_rendezvouses_at_this_machines_name(tmp_path):
    c = discover(hostfile=_hostfile(tmp_path, ["localhost", "node-2.example"]), env={})
    assert c.master_addr == socket.gethostname() != "localhost"


def test_explicit_master_addr_wins(tmp_path):
    c = discover(hostfile=_hostfile(tmp_path, [socket.gethostname(), "node-2.example"]), env={},
                 master_addr="10.0.0.7")
    assert c.master_addr == "10.0.0.7"


@pytest.mark.parametrize("names, addr, match", [
    (["127.0.0.1", "node-2.example"], "localhost", r"--master-addr localhost is a loopback address"),
    (["node-1.example", "node-2.example"], "127.0.0.1", r"--master-addr 127\.0\.0\.1 is a loopback address"),
])
def test_multi_host_loopback_master_addr_is_refused(tmp_path, names, addr, match):
    with pytest.raises(ClusterError, match=match):
        discover(hostfile=_hostfile(tmp_path, names), env={}, master_addr=addr)


def test_master_addr_without_hostfile_is_refused():
    with pytest.raises(ClusterError, match="--master-addr applies to --hostfile"):
        discover(num_gpus=1, env={}, master_addr="10.0.0.7")
