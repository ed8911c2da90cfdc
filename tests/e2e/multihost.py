"""Two real hosts on one machine, for the `multihost` tests: network namespaces, sshd, pdsh.

Hosts ``zt-hosta`` (198.18.0.1) and ``zt-hostb`` (198.18.0.2) are two network namespaces joined by a veth
pair, each with its own sshd started in its own UTS namespace, so ``hostname`` differs per host as on a
cluster. The launcher runs on host a (``HostPair.on_host_a``) and DeepSpeed's pdsh runner reaches both
hosts over ssh. 198.18.0.0/15 is reserved for network benchmarks; traffic only ever goes to these two
addresses and to loopback. File system and process table are shared, so both hosts see the same checkout
and run dir, and ``pgrep -f RUN_DIR`` sees every rank.

Everything set up here is undone by ``teardown``, also after a failure: the namespaces (which removes the
veth pair), the sshd daemons (by pid file), and the lines added to /etc/hosts and ~/.ssh/config.
Needs root and the Debian packages openssh-server, openssh-client, pdsh and iproute2 (.ci/run installs them).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

HOSTS = {"a": ("zt-hosta", "198.18.0.1"), "b": ("zt-hostb", "198.18.0.2")}
NETNS = {"a": "zt-a", "b": "zt-b"}
ETC_HOSTS = Path("/etc/hosts")
SSH_CONFIG = Path.home() / ".ssh" / "config"
TOOLS = ("ip", "unshare", "ssh", "ssh-keygen", "pdsh", "/usr/sbin/sshd")


def missing_tools() -> list[str]:
    """The programs (and privileges) the two hosts need that this machine lacks."""
    missing = [t for t in TOOLS if not shutil.which(t)]
    if os.geteuid() != 0:
        missing.append("root (network namespaces)")
    return missing


def _run(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


@dataclass
class HostPair:
    """Two running hosts; ``work`` holds their keys, sshd pid files and logs."""

    work: Path
    added_hosts_lines: list[str] = field(default_factory=list)
    ssh_block: str = ""
    created_ssh_config: bool = False

    @property
    def names(self) -> list[str]:
        return [HOSTS[h][0] for h in ("a", "b")]

    def on_host_a(self, argv: list[str]) -> list[str]:
        """``argv`` run on host a: in its network namespace, with its hostname."""
        return ["ip", "netns", "exec", NETNS["a"], "unshare", "--uts", "sh", "-c",
                f'hostname {HOSTS["a"][0]} && exec "$@"', "sh", *argv]

    def start_sshd(self, host: str) -> None:
        """Start host's sshd (in its namespace, with its hostname) and wait until it answers."""
        name, addr = HOSTS[host]
        sshd = (f"/usr/sbin/sshd -f /dev/null -o ListenAddress={addr} -o HostKey={self.work / 'hostkey'} "
                f"-o PidFile={self._pidfile(host)} -o AuthorizedKeysFile={self.work / 'authorized_keys'} "
                f"-o PermitRootLogin=prohibit-password -o StrictModes=no -o UsePAM=no "
                f"-o PasswordAuthentication=no -E {self.work / f'sshd-{host}.log'}")
        _run("ip", "netns", "exec", NETNS[host], "unshare", "--uts", "sh", "-c", f"hostname {name} && exec {sshd}")
        deadline = time.monotonic() + 20
        while True:
            res = _run("ip", "netns", "exec", NETNS["a"], "ssh", name, "hostname", check=False)
            if res.returncode == 0 and res.stdout.strip() == name:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"ssh {name} does not answer: {res.stderr.strip()}")
            time.sleep(0.2)

    def stop_sshd(self, host: str) -> None:
        """Stop host's sshd by its pid file (a host that no longer answers ssh)."""
        pidfile = self._pidfile(host)
        if not pidfile.is_file():
            return
        pid = int(pidfile.read_text().strip())
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        for _ in range(100):
            if not _alive(pid):
                break
            time.sleep(0.05)
        pidfile.unlink(missing_ok=True)

    def _pidfile(self, host: str) -> Path:
        return self.work / f"sshd-{host}.pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def setup(work: Path) -> HostPair:
    """Create both hosts; on any failure, undo what was done and re-raise."""
    pair = HostPair(work)
    try:
        _keys(work)
        _network()
        _names(pair)
        _ssh_client_config(pair)
        for host in ("a", "b"):
            pair.start_sshd(host)
    except BaseException:
        teardown(pair)
        raise
    return pair


def teardown(pair: HostPair) -> None:
    """Undo everything ``setup`` did; each step runs even if an earlier one fails."""
    for host in ("a", "b"):
        try:
            pair.stop_sshd(host)
        except (OSError, ValueError):
            pass
    for ns in NETNS.values():
        _run("ip", "netns", "del", ns, check=False)
    if pair.added_hosts_lines:
        lines = ETC_HOSTS.read_text().splitlines(keepends=True)
        ETC_HOSTS.write_text("".join(line for line in lines if line.rstrip("\n") not in pair.added_hosts_lines))
    if pair.ssh_block and SSH_CONFIG.is_file():
        text = SSH_CONFIG.read_text().replace(pair.ssh_block, "")
        if pair.created_ssh_config and not text.strip():
            SSH_CONFIG.unlink()
        else:
            SSH_CONFIG.write_text(text)


def _keys(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / "id"))
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / "hostkey"))
    shutil.copy(work / "id.pub", work / "authorized_keys")
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory


def _network() -> None:
    for ns in NETNS.values():
        if _run("ip", "netns", "exec", ns, "true", check=False).returncode == 0:
            raise RuntimeError(f"network namespace {ns} already exists (another test session?); "
                               f"remove it with `ip netns del {ns}` if it is stale")
    for ns in NETNS.values():
        _run("ip", "netns", "add", ns)
    _run("ip", "link", "add", "zt-va", "type", "veth", "peer", "name", "zt-vb")
    for host, ns in NETNS.items():
        _run("ip", "link", "set", f"zt-v{host}", "netns", ns)
        # The same interface name on both hosts, as on a cluster (NCCL/GLOO_SOCKET_IFNAME=zt0 fits both).
        _run("ip", "netns", "exec", ns, "ip", "link", "set", f"zt-v{host}", "name", "zt0")
        _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{HOSTS[host][1]}/24", "dev", "zt0")
        _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        _run("ip", "netns", "exec", ns, "ip", "link", "set", "zt0", "up")


def _names(pair: HostPair) -> None:
    text = ETC_HOSTS.read_text()
    wanted = [f"{addr} {name}" for name, addr in HOSTS.values()]
    pair.added_hosts_lines = [line for line in wanted if line not in text.splitlines()]
    if pair.added_hosts_lines:
        ETC_HOSTS.write_text(text.rstrip("\n") + "\n" + "\n".join(pair.added_hosts_lines) + "\n")


def _ssh_client_config(pair: HostPair) -> None:
    """ssh (ours, DeepSpeed's and pdsh's) reaches both hosts with the test key, no host-key prompts."""
    SSH_CONFIG.parent.mkdir(mode=0o700, exist_ok=True)
    pair.created_ssh_config = not SSH_CONFIG.is_file()
    pair.ssh_block = (f"\n# zerotune multihost test {pair.work}\nHost {' '.join(pair.names)}\n"
                      f"  IdentityFile {pair.work / 'id'}\n  StrictHostKeyChecking no\n"
                      f"  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  BatchMode yes\n"
                      f"# end zerotune multihost test {pair.work}\n")
    with open(SSH_CONFIG, "a", encoding="utf-8") as fh:
        fh.write(pair.ssh_block)
    SSH_CONFIG.chmod(0o600)


def processes_using(text: str) -> list[int]:
    """pids of processes (on either host: the process table is shared) whose command line contains ``text``."""
    res = _run("pgrep", "-f", text, check=False)
    return [int(p) for p in res.stdout.split() if int(p) != os.getpid()]


def kill_all(pids: list[int]) -> None:
    """SIGKILL each pid (leftovers of a failed test), ignoring those already gone."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
