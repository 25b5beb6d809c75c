"""How chaos_net.py impairs the bed's links: `tc netem` where the kernel has it, else the user-space switch.

netem_unavailable() tries netem on lo of a probe namespace (and `modprobe
sch_netem` where there is a modprobe) and says why it cannot work, quoting the
kernel's config where /proc/config.gz has it. EmulatedImpairment runs
chaos_net_switch.py in the bed's bridge namespace in place of br0 and puts
the ports back on br0 when stopped.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import select
import shutil
import subprocess
import sys
from pathlib import Path

SWITCH = Path(__file__).resolve().parent / "chaos_net_switch.py"
COMMAND_BOUND = 30.0


class ImpairmentFailed(Exception):
    """A command that sets up or removes an impairment did not work."""


def sh(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_BOUND)


def must(argv: list[str]) -> None:
    result = sh(argv)
    if result.returncode != 0:
        raise ImpairmentFailed(f"`{' '.join(argv)}` exited {result.returncode}: {result.stderr.strip()}")


def netem_args(options) -> list[str]:
    return ["netem", "delay", f"{options.delay_ms:g}ms", f"{options.jitter_ms:g}ms", "loss", f"{options.loss:g}%",
            "reorder", f"{options.reorder:g}%", "duplicate", f"{options.duplicate:g}%"]


class Netem:
    """netem on eth0 of every host: each frame between hosts crosses one netem, its sender's."""

    def __init__(self, host_namespaces: list[str], options) -> None:
        self.hosts = host_namespaces
        self.options = options

    def start(self) -> None:
        for host in self.hosts:
            must(["ip", "netns", "exec", host, "tc", "qdisc", "add", "dev", "eth0", "root", *netem_args(self.options)])

    def stop(self) -> None:
        for host in self.hosts:
            sh(["ip", "netns", "exec", host, "tc", "qdisc", "del", "dev", "eth0", "root"])

    def summary(self) -> str:
        return "tc netem " + " ".join(netem_args(self.options)[1:])


def netem_unavailable() -> str | None:
    """Why `tc ... netem` cannot work in a namespace here, or None (tried on lo of a probe namespace)."""
    if shutil.which("tc") is None:
        return "no `tc` (apt install iproute2)"
    probe = f"ctxfs-probe{os.getpid()}"  # netns_helpers removes it if this process dies first
    must(["ip", "netns", "add", probe])
    try:
        argv = ["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"]
        tried = sh(argv)
        if tried.returncode == 0:
            return None
        said = tried.stderr.strip().splitlines()[-1] if tried.stderr.strip() else f"exit {tried.returncode}"
        if shutil.which("modprobe"):
            loaded = sh(["modprobe", "sch_netem"])
            if loaded.returncode == 0 and sh(argv).returncode == 0:
                return None
            modprobe = f"modprobe sch_netem: {loaded.stderr.strip() or 'did not help'}"
        else:
            modprobe = "no modprobe"
        return f"tc netem: {said!r}; {modprobe}{_kernel_config()}"
    finally:
        sh(["ip", "netns", "del", probe])


def short_reason(lacking: str) -> str:
    if "CONFIG_NET_SCH_NETEM is not set" in lacking:
        return "kernel built without sch_netem" + (", no modules" if "CONFIG_MODULES is not set" in lacking else "")
    return lacking[:80]


def _kernel_config() -> str:
    try:
        with gzip.open("/proc/config.gz", "rt") as config:
            text = config.read()
    except OSError:
        return ""
    found = [line for line in text.splitlines()
             if re.search(r"\bCONFIG_(NET_SCH_NETEM|MODULES)\b", line)]
    return f" (kernel {os.uname().release}: {'; '.join(found)})" if found else ""


class EmulatedImpairment:
    """chaos_net_switch.py in the bridge namespace, in place of br0, on ports v1..vN."""

    def __init__(self, bridge_namespace: str, hosts: int, options) -> None:
        self.bridge = bridge_namespace
        self.ports = [f"v{i}" for i in range(1, hosts + 1)]
        self.options = options
        self.proc: subprocess.Popen | None = None
        self.counts: dict = {}

    def start(self) -> None:
        for port in self.ports:
            must(["ip", "-n", self.bridge, "link", "set", port, "nomaster"])
        o = self.options
        argv = ["ip", "netns", "exec", self.bridge, sys.executable, str(SWITCH),
                "--delay-ms", str(o.delay_ms), "--jitter-ms", str(o.jitter_ms), "--loss", str(o.loss / 100),
                "--reorder", str(o.reorder / 100), "--duplicate", str(o.duplicate / 100), *self.ports]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], COMMAND_BOUND)
        line = self.proc.stdout.readline() if ready else ""
        if line.strip() != "ready":
            self.proc.kill()
            raise ImpairmentFailed(f"the impairment switch did not start: {line!r} {self.proc.stderr.read()[-2000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            out, err = self.proc.communicate(timeout=COMMAND_BOUND)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        self.proc = None
        lines = out.strip().splitlines()
        try:
            self.counts = json.loads(lines[-1]) if lines else {}
        except ValueError:
            self.counts = {"error": (err or out)[-500:]}
        for port in self.ports:
            sh(["ip", "-n", self.bridge, "link", "set", port, "master", "br0"])

    def summary(self) -> str:
        c = self.counts
        frames = max(1, c.get("frames", 0))
        return (f"switch: {c.get('frames', 0)} frames, {100 * c.get('lost', 0) / frames:.1f}% lost, "
                f"{100 * c.get('immediate', 0) / frames:.1f}% undelayed, {c.get('duplicated', 0)} duplicated")
