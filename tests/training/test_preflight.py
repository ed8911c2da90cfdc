"""Preflight messages and the bound-address report, without a process group."""

from __future__ import annotations

import socket

from training.preflight import bound_address, failure_message, format_report


def test_named_interface_is_reported_with_its_address():
    assert bound_address("gloo", {"GLOO_SOCKET_IFNAME": "lo"}) == "127.0.0.1 (lo, from GLOO_SOCKET_IFNAME)"
    assert bound_address("nccl", {"NCCL_SOCKET_IFNAME": "lo", "GLOO_SOCKET_IFNAME": "x"}).startswith("127.0.0.1 (lo")
    assert bound_address("gloo", {"GLOO_SOCKET_IFNAME": "zt-no-such-if0"}) == \
        "nothing: GLOO_SOCKET_IFNAME=zt-no-such-if0 is no interface here"


def test_default_is_the_address_the_hostname_resolves_to():
    addr = socket.gethostbyname(socket.gethostname())
    assert bound_address("gloo", {}).startswith(f"{addr} (")


def test_failure_names_host_rendezvous_and_what_to_check(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "node-1")
    monkeypatch.setenv("MASTER_PORT", "29555")
    mine = {"rank": 1, "host": "node-2", "binds": "127.0.1.1 (lo)"}
    text = failure_message(mine, "nccl", 45.2, RuntimeError("Socket Timeout\nmore detail"))
    assert text.startswith("preflight: rank 1 on host node-2 could not join the process group at node-1:29555 "
                           "and all-reduce within 45s (RuntimeError: Socket Timeout)")
    for needle in ("binds 127.0.1.1 (lo) (loopback: ranks on other hosts cannot reach it)", "resolves node-1", "hostname resolution", "NCCL_SOCKET_IFNAME",
                   "firewall", "TCP port 29555", "--no-preflight"):
        assert needle in text
    assert "\n" not in text


def test_report_lists_every_rank_and_host(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "node-1")
    monkeypatch.setenv("MASTER_PORT", "29555")
    table = [{"rank": 0, "host": "node-1", "binds": "10.0.0.1 (eth0)"}, {"rank": 1, "host": "node-2",
                                                                        "binds": "10.0.0.2 (eth0)"}]
    lines = format_report(table, 1.25, "gloo").splitlines()
    assert lines[0] == "preflight: 2 ranks on 2 host(s) joined (gloo, rendezvous node-1:29555) and all-reduced in 1.2s"
    assert "rank    1  node-2" in lines[2] and lines[2].endswith("binds 10.0.0.2 (eth0)")
    table[1]["binds"] = "127.0.1.1 (lo)"
    assert format_report(table, 1.0, "gloo").endswith("binds 127.0.1.1 (lo) (loopback: ranks on other hosts cannot "
                                                      "reach it)")
    assert "loopback" not in format_report(table[1:], 1.0, "gloo")
