"""Start, wait for and stop a `vllm serve` process on loopback (demo, tests, benchmarks)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CPU_DEFAULT_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2"}


def fetch_metrics(base_url: str) -> str:
    """The Prometheus text a server's /metrics serves."""
    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as r:
        return r.read().decode()


def metric_value(text: str, name: str) -> float | None:
    """Sum of a metric's samples over all label sets; None when the server does not export it."""
    values = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    return sum(values) if values else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_command() -> list[str]:
    exe = Path(sys.executable).with_name("vllm")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("vllm")
    return [found] if found else [sys.executable, "-m", "vllm.entrypoints.cli.main"]


class VllmServer:
    """`vllm serve MODEL` as a child process; `plugin=False` runs stock vLLM (no plugins)."""

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        plugin: bool = True,
        args: list[str] | tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        port: int | None = None,
        log_path: str | os.PathLike | None = None,
        startup_timeout: float = 900.0,
        progress: bool = True,
    ) -> None:
        self.model = str(model)
        self.plugin = plugin
        self.args = list(args)
        self.port = port or free_port()
        self.env = {**CPU_DEFAULT_ENV, **os.environ, **(env or {})}
        if not plugin:
            self.env["VLLM_PLUGINS"] = ""  # an empty allow-list loads no general plugin
        self.log_path = Path(log_path) if log_path else Path(f"/tmp/vllm-serve-{self.port}.log")
        self.startup_timeout = startup_timeout
        self.progress = progress
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [*vllm_command(), "serve", self.model, "--host", "127.0.0.1", "--port", str(self.port)]
        if self.plugin:
            cmd += ["--plugin", "pio_fvlm"]
        return cmd + self.args

    def _say(self, msg: str) -> None:
        if self.progress:
            print(f"[vllm-server :{self.port}] {msg}", file=sys.stderr, flush=True)

    def start(self) -> "VllmServer":
        self._say(" ".join(self.command()) + f"  (log: {self.log_path})")
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        log.close()
        self.wait_ready()
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_ready(self) -> None:
        start = time.monotonic()
        last_note = start
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"vllm serve exited with code {self.process.returncode} while starting; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            if self.healthy():
                self._say(f"ready after {time.monotonic() - start:.0f}s")
                return
            now = time.monotonic()
            if now - start > self.startup_timeout:
                self.stop()
                raise TimeoutError(f"vllm serve not ready after {self.startup_timeout:.0f}s:\n{self.log_tail()}")
            if now - last_note >= 15:
                self._say(f"starting... {now - start:.0f}s")
                last_note = now
            time.sleep(1.0)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        pgid = os.getpgid(self.process.pid)
        # Like Ctrl-C on the server alone: it shuts its engine processes down itself.
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.process.wait(timeout=30)
        # Engine processes live in the same session; make sure none outlives the server.
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._say("stopped")

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
