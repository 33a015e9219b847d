"""A real redis-server on loopback, for the control plane's tests.

    redis = RedisServer(tmp_path); redis.start()
    redis.url -> 'redis://127.0.0.1:PORT/0'
    redis.stop(); redis.start()   # the same port and data directory: with
                                  # appendonly the stream survives
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from support.net import free_port
from support.procs import stop_process


class RedisServer:
    def __init__(self, workdir: Path, host: str = "127.0.0.1") -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = free_port(host)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        argv = [binary, "--bind", self.host, "--port", str(self.port), "--dir", str(self.dir),
                "--appendonly", "yes", "--appendfsync", "always", "--save", "",
                "--protected-mode", "no", "--daemonize", "no"]
        with open(self.dir / "redis.log", "ab") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError("redis-server exited:\n"
                                   + (self.dir / "redis.log").read_text(errors="replace"))
            if self._pings():
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on {self.host}:{self.port}")

    def _pings(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> str:
        """One command through redis-cli's protocol, the reply's first line."""
        with socket.create_connection((self.host, self.port), timeout=2.0) as sock:
            parts = [f"*{len(args)}\r\n".encode()]
            for arg in args:
                data = arg.encode()
                parts.append(f"${len(data)}\r\n".encode() + data + b"\r\n")
            sock.sendall(b"".join(parts))
            return sock.recv(65536).decode(errors="replace").split("\r\n")[0]

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
