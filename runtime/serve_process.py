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
import time
import urllib.error
import urllib.request
from pathlib import Path

from cxr.runtime.errors import CxrError


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
