"""Start a local ``fly-vllm serve`` process and stop it cleanly.

Used by the serving benchmarks and the tests: the server runs in its own
process group, so stopping it stops the engine-core process too, and its
resident memory can be read as the sum over that group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_cmd(model: str, spec: str | None, port: int, *extra: str) -> list[str]:
    """`spec`: a fly.json path or inline JSON; None serves without speculation."""
    cmd = [sys.executable, "-m", "fly_vllm.cli", "serve", model, "--host", "127.0.0.1",
           "--port", str(port)]
    if spec is not None:
        cmd += ["--speculative-config", spec]
    return cmd + list(extra)


@dataclass
class Server:
    base: str
    proc: subprocess.Popen
    log: Path
    model: str

    def rss_bytes(self) -> int:
        """Resident memory of every process in the server's process group
        (API server, engine core, helpers)."""
        import psutil

        total = 0
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(p.info["pid"]) == self.proc.pid:
                    total += p.memory_info().rss
            except (ProcessLookupError, psutil.Error, PermissionError):
                continue
        return total

    def stop(self, timeout: float = 60) -> None:
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def wait_healthy(base: str, proc: subprocess.Popen | None, log: Path | None,
                 timeout: float) -> None:
    import requests

    deadline = time.time() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-4000:] if log else ""
            raise RuntimeError(f"server exited with {proc.returncode} before it was "
                               f"healthy:\n{tail}")
        if time.time() > deadline:
            raise TimeoutError(f"{base} did not answer /health in {timeout:.0f} s")
        try:
            if requests.get(base + "/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)


@contextlib.contextmanager
def launched(model: str, spec: str | None, log: Path, *extra: str,
             env: dict[str, str] | None = None, timeout: float = 300):
    """Run ``fly-vllm serve MODEL`` on a free port of 127.0.0.1 until the
    block exits; yields a `Server`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(os.environ if env is None else env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    with open(log, "w") as f:
        proc = subprocess.Popen(serve_cmd(model, spec, port, *extra), env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", proc, log, model)
    try:
        wait_healthy(server.base, proc, log, timeout)
        yield server
    finally:
        server.stop()
