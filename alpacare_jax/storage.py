"""Local paths and Cloud Storage URLs (gs://bucket/...) read and written through one interface.

On a TPU pod everything (base weights, datasets, checkpoints, exports) naturally lives in a bucket, and
every host runs the same command, so code that takes a path takes either kind. `etils.epath.Path` is the
pathlib-like handle for both (it reaches gs:// through fsspec/gcsfs when TensorFlow is absent); this
module adds what epath lacks: several byte ranges of a file fetched concurrently (fsspec `cat_ranges`, so
a host reads just the rows of a tensor it needs with many requests in flight), writes that never leave a
partial file under its final name, and local copies for libraries that only open local files.

gcsfs finds its credentials the usual way (application default credentials, the TPU VM's service account);
`STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT` points it at an emulator instead.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO

import fsspec
from etils import epath
from fsspec.asyn import AsyncFileSystem

PathLike = str | os.PathLike


def is_url(path: PathLike) -> bool:
    """True for a `scheme://` location (gs://, s3://, memory://), False for a local path."""
    return "://" in os.fspath(path)


def makedirs(path: epath.Path) -> None:
    """Creates a local directory; a no-op for URLs (buckets have no directories, and creating a missing
    bucket from a typo in a path is never wanted)."""
    if not is_url(path):
        Path(path).mkdir(parents=True, exist_ok=True)


# Requests of one `read_ranges` call in flight at once (for a URL). A host's throughput from Cloud Storage
# grows with parallel streams; a handful already gives several hundred MB/s per host.
MAX_REQUESTS_IN_FLIGHT = 4


def read_ranges(file: PathLike, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    """The bytes [start, end) of `file` for each range; for a URL up to `MAX_REQUESTS_IN_FLIGHT` at a time.

    A range that runs past the end of the file comes back short; the caller checks lengths.
    """
    fs, fs_path = fsspec.core.url_to_fs(os.fspath(file))
    concurrency = {"batch_size": MAX_REQUESTS_IN_FLIGHT} if isinstance(fs, AsyncFileSystem) else {}
    return list(fs.cat_ranges([fs_path] * len(ranges), [s for s, _ in ranges], [e for _, e in ranges],
                              on_error="raise", **concurrency))


@contextlib.contextmanager
def atomic_writer(path: PathLike) -> Iterator[IO[bytes]]:
    """A binary file that appears under `path` only once it is completely written.

    Local: written under a temporary name and renamed into place. Cloud Storage: an object becomes visible
    only when its upload is finalised, so it is written directly and the upload is discarded on an error.
    """
    if not is_url(path):
        final = Path(path)
        tmp = final.with_name(f".{final.name}.tmp")
        try:
            with open(tmp, "wb") as f:
                yield f
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return
    fs, fs_path = fsspec.core.url_to_fs(os.fspath(path))
    f = fs.open(fs_path, "wb")
    try:
        yield f
    except BaseException:
        f.discard()  # fsspec's close() would commit what was written so far
        raise
    f.close()


def write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_writer(path) as f:
        f.write(data)


_LOCAL_COPIES: list[str] = []


@atexit.register
def _remove_local_copies() -> None:
    for directory in _LOCAL_COPIES:
        shutil.rmtree(directory, ignore_errors=True)


def local_copy(directory: PathLike, names: Iterable[str]) -> Path:
    """A local directory holding those of `names` that exist in `directory`, for libraries that only open
    local files (sentencepiece, tokenizers). A local `directory` is returned as it is; a URL's files are
    copied into a temporary directory removed when the process exits."""
    if not is_url(directory):
        return Path(directory)
    local = tempfile.mkdtemp(prefix="alpacare-jax-")
    _LOCAL_COPIES.append(local)
    for name in names:
        remote = epath.Path(directory) / name
        if remote.exists():
            (Path(local) / name).write_bytes(remote.read_bytes())
    return Path(local)


@contextlib.contextmanager
def local_staging(out_dir: PathLike) -> Iterator[Path]:
    """A local directory to write files into that end up in `out_dir`: `out_dir` itself when it is local;
    for a URL a temporary directory whose files are uploaded when the block ends without an error."""
    if not is_url(out_dir):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        yield Path(out_dir)
        return
    with tempfile.TemporaryDirectory(prefix="alpacare-jax-") as local:
        yield Path(local)
        for file in sorted(Path(local).iterdir()):
            write_bytes(epath.Path(out_dir) / file.name, file.read_bytes())
