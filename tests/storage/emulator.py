"""A Cloud Storage emulator on 127.0.0.1 for the tests: `gcp-storage-emulator` in a subprocess, with gcsfs (and
so etils epath and `alpacare_jax.storage`) pointed at it.

The `gcs_emulator` fixture starts one emulator per test session (about a second); `gcs_bucket` gives each test
a fresh bucket. Subprocesses reach the same emulator with `GcsEmulator.env()`. `CountingProxy` relays one
client's connections to the emulator and counts the bytes sent back: what that client downloaded, measured
outside the code under test.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# gcsfs reads this when it is imported. Its experimental hierarchical-namespace class first probes every
# bucket over gRPC, which the emulator does not serve: each probe would wait 60 s before falling back.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class GcsEmulator:
    url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen
    _buckets: itertools.count = dataclasses.field(default_factory=itertools.count)

    def env(self, url: str | None = None) -> dict[str, str]:
        """Environment variables that point every Cloud Storage client in use (gcsfs and so etils epath,
        tensorstore under orbax, array_record under TFDS, google-cloud-storage under tensorboardX) at the
        emulator (or at `url`, e.g. a `CountingProxy`), anonymously: no credentials are looked up or sent."""
        url = url or self.url
        return {"STORAGE_EMULATOR_HOST": url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "FSSPEC_GCS_TOKEN": "anon",
                # orbax writes checkpoints through tensorstore, whose GCS driver has its own endpoint setting
                "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "anonymous",
                # array_record (TFDS's reader) brings its own google-cloud-cpp client
                "CLOUD_STORAGE_EMULATOR_ENDPOINT": url}

    def new_bucket(self) -> str:
        """A new empty bucket; returns its gs:// URL."""
        import gcsfs

        name = f"bucket-{os.getpid()}-{next(self._buckets)}"
        gcsfs.GCSFileSystem(token="anon", endpoint_url=self.url).mkdir(name)
        return f"gs://{name}"


def start_emulator() -> GcsEmulator:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.storage.emulator_server", "start", "--host=127.0.0.1", f"--port={port}",
         "--in-memory", "--quiet"], cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b?project=test", timeout=1).read()
            return GcsEmulator(url, process)
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"gcp-storage-emulator did not start: {process.stderr.read()}") from None
            time.sleep(0.05)


@pytest.fixture(scope="session")
def gcs_emulator():
    """One emulator for the session; this process's gcsfs talks to it while the session runs."""
    import fsspec

    emulator = start_emulator()
    saved_env = {k: os.environ.get(k) for k in emulator.env()}
    saved_conf = fsspec.config.conf.get("gcs")
    os.environ.update(emulator.env())
    fsspec.config.conf["gcs"] = {**(saved_conf or {}), "token": "anon"}
    try:
        yield emulator
    finally:
        emulator.process.kill()
        emulator.process.wait()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if saved_conf is None:
            fsspec.config.conf.pop("gcs", None)
        else:
            fsspec.config.conf["gcs"] = saved_conf


@pytest.fixture
def gcs_bucket(gcs_emulator) -> str:
    return gcs_emulator.new_bucket()


class CountingProxy:
    """A TCP relay on 127.0.0.1 to the emulator that counts the bytes the emulator sends through it."""

    def __init__(self, target_url: str):
        self._target = ("127.0.0.1", int(target_url.rsplit(":", 1)[1]))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.bytes_served = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self._target)
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, count: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
                if count:
                    with self._lock:
                        self.bytes_served += len(data)
        except OSError:
            pass
        finally:  # pass the end on; the other direction's thread closes `sink` when it ends
            try:
                sink.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            source.close()

    def close(self) -> None:
        self._listener.close()
