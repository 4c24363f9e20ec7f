"""`python -m gcp_storage_emulator start ...`, with two fixes that the clients under test need.

- Object generations in download headers. Cloud Storage sends an object's generation with its bytes
  (`x-goog-generation`); tensorstore relies on it for the read-modify-write of an OCDBT manifest, which
  orbax does whenever several array shards go into one checkpoint item, and stops with "Malformed
  StorageGeneration" without it. gcp-storage-emulator (2026.7) leaves the header out.
- One thread per connection. The emulator serves one connection at a time, so a client that keeps an idle
  connection open (gcsfs, tensorboardX's uploader and tensorstore all run at once in a training process)
  starves the others until every one of them waits forever. Requests are still handled one at a time
  (under a lock): the emulator's in-memory store is not meant for concurrent use.

Both are patched in before the server is built; the emulator is otherwise unchanged.
"""

import http.server
import sys
import threading

from gcp_storage_emulator import server as emulator
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])
    except Exception:  # noqa: BLE001 (a missing object: the original handler answers 404)
        pass
    return _download(request, response, storage, *args, **kwargs)


_one_request_at_a_time = threading.Lock()
_handle = emulator.Router.handle


def handle(self, method):
    with _one_request_at_a_time:
        return _handle(self, method)


emulator.HANDLERS = [(regex, {m: download if h is objects.download else h for m, h in handlers.items()})
                     for regex, handlers in emulator.HANDLERS]
objects.download = download  # `GET .../o/NAME?alt=media` (tensorstore's reads) goes through objects.get to here
emulator.Router.handle = handle
emulator.server.HTTPServer = http.server.ThreadingHTTPServer  # `server` is http.server, as the emulator names it

if __name__ == "__main__":
    from gcp_storage_emulator.__main__ import main

    main(sys.argv[1:])
