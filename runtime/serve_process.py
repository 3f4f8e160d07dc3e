"""Start ``cxr-run serve`` as a child process on free loopback ports, wait until ready, stop it cleanly.

Used by the load benchmark and the serving tests: one way to run a real Triton server, bounded in time.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from cxr.runtime.errors import CxrError


def process_tree(root: int) -> list[int]:
    """``root`` and every process below it (tritonserver, its Python stubs), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces
        parents.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(parents.get(pid, []))
    return tree


def status_kib(pid: int, *fields: str) -> dict[str, int]:
    """Fields of /proc/PID/status and smaps_rollup in KiB (VmRSS, VmHWM, Pss ...); missing ones are 0."""
    values = dict.fromkeys(fields, 0)
    for name in ("status", "smaps_rollup"):
        try:
            lines = Path(f"/proc/{pid}/{name}").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            key, _, rest = line.partition(":")
            if key in values and rest.split():
                values[key] = int(rest.split()[0])
    return values


class MemorySampler:
    """Samples a process tree's memory until stopped: the peak of its summed PSS (shared memory counted
    once) and, per process, the kernel's own high-water mark of resident memory (VmHWM)."""

    def __init__(self, root: int, interval_s: float = 0.25) -> None:
        self.root, self.interval_s = root, interval_s
        self.peak_pss_kib, self.hwm_kib = 0, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        total = 0
        for pid in process_tree(self.root):
            values = status_kib(pid, "Pss", "VmHWM")
            total += values["Pss"]
            self.hwm_kib[pid] = max(self.hwm_kib.get(pid, 0), values["VmHWM"])
        self.peak_pss_kib = max(self.peak_pss_kib, total)

    def report(self) -> dict[str, float]:
        """Peak summed PSS of the tree, the serving process's own VmHWM (the HTTP front and the model
        instances live there) and the largest VmHWM below it (tritonserver or a stub), in MB."""
        others = [kib for pid, kib in self.hwm_kib.items() if pid != self.root]
        return {
            "tree_peak_pss_mb": round(self.peak_pss_kib / 1024, 1),
            "serve_process_hwm_mb": round(self.hwm_kib.get(self.root, 0) / 1024, 1),
            "largest_child_hwm_mb": round(max(others, default=0) / 1024, 1),
            "processes": len(self.hwm_kib),
        }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``with ServerProcess(bundle, "--max-batch", "16") as server: server.http_url ...``"""

    def __init__(self, bundle: Path, *args: str, name: str = "cxr", startup_s: float = 180.0) -> None:
        self.bundle, self.args, self.name, self.startup_s = bundle, args, name, startup_s
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.log = Path(tempfile.mkstemp(prefix="cxr-serve-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None
        self.returncode: int | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def _ready(self) -> bool:
        try:
            for path in (
                "/v2/health/ready",
                f"/v2/models/{self.name}/ready",
                f"/v2/models/{self.name}_card/ready",
            ):
                with urllib.request.urlopen(self.http_url + path, timeout=2) as reply:
                    if reply.status != 200:
                        return False
            return True
        except (urllib.error.URLError, OSError):
            return False

    def is_ready(self) -> bool:
        return self.process is not None and self.process.poll() is None and self._ready()

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> ServerProcess:
        command = [
            sys.executable,
            "-m",
            "cxr.runtime.cli",
            "serve",
            "--model",
            str(self.bundle),
            "--name",
            self.name,
            "--http-port",
            str(self.http_port),
            "--grpc-port",
            str(self.grpc_port),
            "--metrics-port",
            str(self.metrics_port),
            "--log-file",
            f"{self.log}.triton",
            *self.args,
        ]
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise CxrError(f"cxr-run serve exited with {self.process.returncode}:\n{self.tail()}")
            if self._ready():
                return self
            time.sleep(0.5)
        self.stop()
        raise CxrError(f"cxr-run serve not ready after {self.startup_s:.0f} s:\n{self.tail()}")

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (as a service manager would), then SIGKILL the whole group if it hangs."""
        if self.process is None:
            return -1
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.returncode = self.process.returncode
        return self.returncode

    def __exit__(self, *exc: object) -> None:
        if self.stop() == 0 and exc[0] is None:  # logs stay behind only when something went wrong
            for path in (self.log, Path(f"{self.log}.triton")):
                path.unlink(missing_ok=True)
