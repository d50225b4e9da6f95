"""Hosts for the cluster tests: network namespaces joined to the root namespace by veth links, each
running one `llmctl serve` replica, and vLLM's router started by `llmctl router` in the root namespace.

Each namespace is a host with its own network stack, reached over its own /24 (10.213.x.0/24 here,
addresses that exist only on the links these helpers create). Names carry the test run's process id,
so runs side by side do not meet, and everything is removed on exit, failures included.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from llmctl.server.testing import free_port

SUBNET_PREFIX = "10.213"
WORKER_PORT = 8080


def missing_requirement() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (apt-get install iproute2)"
    probe = f"llmctl-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True, check=False)
    if shutil.which("vllm-router", path=str(Path(sys.executable).parent)) is None \
            and shutil.which("vllm-router") is None:
        return "vllm-router is not installed (the cluster extra: pip install 'llmctl[cluster]')"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _free_subnets(count: int) -> list[int]:
    """Third octets of 10.213.x.0/24 that no interface of this machine uses yet."""
    used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, check=True).stdout
    start = os.getpid() % 200
    found = [x for x in (*range(start, 250), *range(1, start)) if f" {SUBNET_PREFIX}.{x}." not in used]
    return found[:count]


@dataclass
class Host:
    """One namespace: its name, its veth link, its address, and the replica running in it."""

    name: str
    link: str
    address: str
    proc: subprocess.Popen | None = None
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}:{WORKER_PORT}"


@dataclass
class Cluster:
    """Three hosts with a replica each, the model they serve and the key they require."""

    hosts: list[Host]
    model: Path
    api_key: str
    logs: Path
    routers: list[subprocess.Popen] = field(default_factory=list)
    router_logs: dict[str, Path] = field(default_factory=dict)  # each router's log, by its URL

    def start_worker(self, host: Host) -> None:
        host.log = self.logs / f"{host.name}.log"
        args = ["ip", "netns", "exec", host.name, sys.executable, "-m", "llmctl", "serve",
                "--model-path", str(self.model), "--host", host.address, "--port", str(WORKER_PORT),
                "--dtype", "float32", "--device", "cpu", "--api-key", self.api_key,
                "--max-num-seqs", "8", "--kv-cache-tokens", "16384", "--prefix-cache-tokens", "8192",
                "--grace-period", "1", "--log-level", "warning"]
        with host.log.open("ab") as log:
            host.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, host: Host, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if host.proc is not None and host.proc.poll() is not None:
                raise AssertionError(f"the replica in {host.name} exited: {host.log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{host.url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"the replica in {host.name} was not ready after {timeout} s")

    def kill_worker(self, host: Host) -> None:
        """SIGKILL: the replica dies at once, mid-request, as a crashed machine would."""
        assert host.proc is not None
        host.proc.send_signal(signal.SIGKILL)
        host.proc.wait(timeout=30)

    def router_log_tail(self, url: str, lines: int = 40) -> str:
        """The last ``lines`` of the router at ``url``'s log, without its colour codes: for a failure's message."""
        text = re.sub(r"\x1b\[[0-9;]*m", "", self.router_logs[url].read_text(errors="replace"))
        return "\n".join(text.splitlines()[-lines:])

    def start_router(self, policy: str) -> tuple[str, str]:
        """`llmctl router` with these replicas, on 127.0.0.1; once it answers, returns its URL and the URL
        of its Prometheus metrics."""
        port, metrics_port = free_port(), free_port()
        log = (self.logs / f"router-{policy}-{port}.log").open("ab")
        args = [sys.executable, "-m", "llmctl", "router", "--host", "127.0.0.1", "--port", str(port),
                "--policy", policy, "--api-key", self.api_key, "--health-check-interval", "1",
                "--prometheus-port", str(metrics_port)]
        for host in self.hosts:
            args += ["--worker-url", host.url]
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.routers.append(proc)
        url = f"http://127.0.0.1:{port}"
        self.router_logs[url] = Path(log.name)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"the router exited: {Path(log.name).read_text()[-2000:]}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return url, f"http://127.0.0.1:{metrics_port}/metrics"
            time.sleep(0.2)
        raise AssertionError("the router did not answer within 60 s")


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def cluster(model: Path, logs: Path, api_key: str, count: int = 3) -> Iterator[Cluster]:
    """``count`` namespaces with a replica each (ready when this yields); all of it removed on exit."""
    tag = os.getpid()
    hosts: list[Host] = []
    made = Cluster(hosts, model, api_key, logs)
    try:
        for i, octet in enumerate(_free_subnets(count)):
            # Interface names are at most 15 characters: "lc" + pid + side + index.
            host = Host(f"llmctl-{tag}-h{i}", f"lc{tag}r{i}", f"{SUBNET_PREFIX}.{octet}.2")
            inside = f"lc{tag}n{i}"
            _ip("netns", "add", host.name)
            hosts.append(host)
            _ip("link", "add", host.link, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", host.name)
            _ip("addr", "add", f"{SUBNET_PREFIX}.{octet}.1/24", "dev", host.link)
            _ip("link", "set", host.link, "up")
            _ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", inside)
            _ip("-n", host.name, "link", "set", inside, "up")
            _ip("-n", host.name, "link", "set", "lo", "up")
        for host in hosts:
            made.start_worker(host)
        for host in hosts:
            made.wait_ready(host)
        yield made
    finally:
        for proc in made.routers:
            # The router keeps no state worth a graceful stop.
            proc.kill()
            proc.wait(timeout=10)
        for host in hosts:
            _stop(host.proc)
            # Deleting the namespace removes its end of the link, and so the pair.
            subprocess.run(["ip", "netns", "delete", host.name], capture_output=True, check=False)
            subprocess.run(["ip", "link", "delete", host.link], capture_output=True, check=False)
