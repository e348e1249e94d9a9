"""Real ``celery -A bridge worker`` / ``celery -A bridge beat`` subprocesses for the fault suite.

Each process is started in its own session (``start_new_session``), so the process group id is the
PID we started: stopping it signals that group only, which reaches the prefork pool children the
worker made (and nothing else on the machine), even when the worker's main process was SIGKILLed.
Configuration goes through ``ANALYTICS_*`` environment variables, as in production.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from analytics_sdk import Settings
from analytics_sdk._settings import env_name

__all__ = ["CeleryProcess", "REPO_ROOT", "settings_env", "start_beat", "start_worker"]

REPO_ROOT = Path(__file__).resolve().parents[2]
_READY_TIMEOUT = 60.0


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a worker needs to see ``settings`` (plus raw ``extra`` variables)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANALYTICS_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    defaults = Settings()
    for name in Settings.__dataclass_fields__:
        value = getattr(settings, name)
        if value is None or value == getattr(defaults, name):
            continue
        env[env_name(name)] = str(int(value) if isinstance(value, bool) else value)
    env.update(extra)
    return env


class CeleryProcess:
    """One celery subprocess; its output goes to ``log_path`` (read it for assertions)."""

    def __init__(self, args: list[str], env: Mapping[str, str], log_path: Path) -> None:
        self.args = args
        self.env = dict(env)
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            args,
            cwd=REPO_ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def __repr__(self) -> str:
        return f"<CeleryProcess pid={self.pid} {' '.join(self.args[3:6])}>"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, pattern: str = r"\S+@\S+ ready\.", timeout: float = _READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.log()):
            if not self.alive():
                raise RuntimeError(f"{self!r} exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self!r} not ready within {timeout}s:\n{self.log()[-4000:]}")
            time.sleep(0.1)

    def pool_pids(self) -> list[int]:
        """PIDs of the worker's direct children (the prefork pool processes)."""
        children: list[int] = []
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{self.pid}/task").iterdir():
                text = (task / "children").read_text()
                children.extend(int(x) for x in text.split())
        return sorted(set(children))

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.log()))

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group (warm shutdown), SIGKILL it past ``timeout``. Idempotent."""
        self._signal_group(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        self.kill()

    def kill(self) -> None:
        """SIGKILL the whole group we started (main process and pool children) and reap."""
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        self._log.close()

    def _signal_group(self, sig: signal.Signals) -> None:
        # The group id is our child's PID (start_new_session); it only holds what that child made.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)


def start_worker(
    env: Mapping[str, str],
    log_path: Path,
    *,
    concurrency: int = 1,
    name: str = "w1",
    extra: tuple[str, ...] = (),
    wait: bool = True,
) -> CeleryProcess:
    """``celery -A bridge worker -Q analytics`` with a prefork pool of ``concurrency`` processes."""
    args = [
        sys.executable, "-m", "celery", "-A", "bridge", "worker", "-Q", "analytics",
        "-P", "prefork", "-c", str(concurrency), "-n", f"{name}@%h", "--loglevel", "INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat", *extra,
    ]  # fmt: skip
    worker = CeleryProcess(args, env, log_path)
    if wait:
        try:
            worker.wait_ready()
        except BaseException:
            worker.kill()
            raise
    return worker


def start_beat(env: Mapping[str, str], directory: Path, name: str = "beat") -> CeleryProcess:
    """``celery -A bridge beat`` with its schedule file in ``directory``."""
    args = [
        sys.executable, "-m", "celery", "-A", "bridge", "beat", "--loglevel", "INFO",
        "-s", str(directory / f"{name}-schedule"), "--pidfile", str(directory / f"{name}.pid"),
    ]  # fmt: skip
    beat = CeleryProcess(args, env, directory / f"{name}.log")
    try:
        beat.wait_ready(r"beat: Starting\.\.\.")
    except BaseException:
        beat.kill()
        raise
    return beat
