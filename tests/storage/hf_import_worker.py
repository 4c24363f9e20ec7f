"""One of the two processes of `test_hf_gcs.py`: joins a 2-process JAX cluster on localhost, imports the HF
checkpoint from gs:// onto an FSDP mesh over all 8 devices, and checks it against the same import from the
local directory and against transformers' logits (saved by the test).

Usage: python hf_import_worker.py PROCESS_ID PORT GS_URL LOCAL_DIR OUT_DIR
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils


def main(process_id: int, port: int, url: str, local_dir: str, out_dir: str) -> None:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                               initialization_timeout=120)
    from alpacare_jax import hf, sharding

    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=-1))
    from_gs = hf.load_pretrained(url, mesh=mesh)
    from_local = hf.load_pretrained(local_dir, mesh=mesh)
    identical = all(
        a.sharding == b.sharding and all(np.array_equal(np.asarray(x.data), np.asarray(y.data))
                                         for x, y in zip(a.addressable_shards, b.addressable_shards))
        for a, b in zip(jax.tree.leaves(nnx.state(from_gs)), jax.tree.leaves(nnx.state(from_local))))
    ids = np.load(f"{out_dir}/ids.npy")
    with sharding.activate(mesh):
        logits = jax.jit(lambda m, x: m(x))(from_gs, jnp.asarray(ids))
    logits = multihost_utils.process_allgather(logits, tiled=True)
    error = float(np.max(np.abs(logits - np.load(f"{out_dir}/logits.npy"))))
    with open(f"{out_dir}/process{process_id}.json", "w") as f:
        json.dump({"identical_to_local": bool(identical), "logits_max_error": error}, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
