"""Import time of a 1 GiB HF checkpoint from Cloud Storage (a local emulator on 127.0.0.1), two ways:

- ours: `hf.load_pretrained("gs://...")`, ranged reads of the tensor rows straight into device buffers;
- the peer: a plain download-then-load, `gcsfs.GCSFileSystem.get` of the directory to local disk, then
  `hf.load_pretrained(local_dir)` (what copying the checkpoint to each host by hand amounts to).

Rounds alternate (ours, peer, ours, ...) and the best of each is reported with the ratio; one warm-up load
from local disk first, so that neither side pays for compiling the buffer updates. Both results are
checked to be bit-identical.

    python bench/gcs_import.py [--hidden 1024 --layers 16 --shard 250MB --rounds 3]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # the emulator the tests start

from tests.storage.emulator import start_emulator  # noqa: E402  (sets gcsfs's environment before it is imported)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--mlp", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--shard", default="250MB", help="max_shard_size of the checkpoint's safetensors files")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    emulator = start_emulator()
    try:
        os.environ.update(emulator.env())
        run(args, emulator)
    finally:
        emulator.process.kill()


def run(args: argparse.Namespace, emulator) -> None:
    import fsspec
    import jax
    import numpy as np
    from flax import nnx

    from alpacare_jax import hf
    from alpacare_jax.model import Llama, LlamaConfig

    fs = fsspec.filesystem("gcs")
    config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.mlp,
                         num_layers=args.layers, num_heads=args.hidden // 64, num_kv_heads=args.hidden // 64)
    work = Path(tempfile.mkdtemp(prefix="gcs-import-bench-"))
    try:
        source = work / "model"
        hf.save_pretrained(Llama(config, rngs=nnx.Rngs(0)), source, dtype="float32", max_shard_size=args.shard)
        files = sorted(source.iterdir())
        size = sum(f.stat().st_size for f in files if f.suffix == ".safetensors")
        url = f"{emulator.new_bucket()}/model"
        start = time.perf_counter()
        for f in files:
            fs.put(str(f), f"{url}/{f.name}")
        print(f"checkpoint: {size / 2**30:.2f} GiB in {sum(f.suffix == '.safetensors' for f in files)} safetensors "
              f"files; uploaded to the emulator in {time.perf_counter() - start:.1f} s")

        def ours():
            return hf.load_pretrained(url)

        def download_then_load():
            local = work / "downloaded"
            fs.get(f"{url}/", str(local), recursive=True)
            try:
                return hf.load_pretrained(local)
            finally:
                shutil.rmtree(local)

        def timed(load):
            start = time.perf_counter()
            model = load()
            jax.block_until_ready(nnx.state(model))
            return time.perf_counter() - start, model

        timed(lambda: hf.load_pretrained(source))  # warm-up: compiles the in-place buffer updates
        times: dict[str, list[float]] = {"ours": [], "peer": []}
        for i in range(args.rounds):
            for name, load in (("ours", ours), ("peer", download_then_load)):
                seconds, model = timed(load)
                times[name].append(seconds)
                print(f"round {i + 1}: {name} {seconds:.2f} s", flush=True)
                if i == 0:
                    leaves = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]
                    if name == "ours":
                        reference = leaves
                    else:
                        assert all(np.array_equal(a, b) for a, b in zip(reference, leaves)), "imports differ"
                del model
    finally:
        shutil.rmtree(work, ignore_errors=True)

    best = {name: min(t) for name, t in times.items()}
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("gcsfs", "fsspec", "gcp-storage-emulator"))
    print(f"\nimport of {size / 2**30:.2f} GiB from the emulator, best of {args.rounds} ({versions}):")
    print(f"  ours (ranged reads into device buffers): {best['ours']:.2f} s ({size / 2**20 / best['ours']:.0f} MiB/s)")
    print(f"  download-then-load (gcsfs get + local load): {best['peer']:.2f} s "
          f"({size / 2**20 / best['peer']:.0f} MiB/s)")
    print(f"  ratio peer / ours: {best['peer'] / best['ours']:.2f}x")
    print(f"  load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
