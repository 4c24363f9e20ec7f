"""One of the processes of `test_multiprocess.py`: joins a 2-process JAX cluster on localhost, reads
its shard of the sample dataset through the real pipeline, assembles a global batch, and writes what
it saw to a JSON file for the test to check.

Usage: python multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT DATA_DIR TOKENIZER_DIR OUT_JSON
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils


def example_texts(batch, tokenizer):
    """Decoded tokens of every example (segment) in a batch."""
    texts = []
    for r, seg in enumerate(batch["segment_ids"]):
        for s in np.unique(seg[seg > 0]):
            where = seg == s
            texts.append(tokenizer.decode(np.concatenate([batch["input_ids"][r][where],
                                                          batch["labels"][r][where][-1:]])))
    return texts


def main(process_id: int, num_processes: int, port: int, data_dir: str, tokenizer_dir: str, out: str) -> None:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                               process_id=process_id, initialization_timeout=120)
    from alpacare_jax import sharding
    from alpacare_jax.data import pipeline
    from alpacare_jax.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    config = pipeline.default_data_config()
    config.data_dir = data_dir
    config.max_length = 512
    config.global_batch_size = 4
    config.read_threads = 0
    # Defaults come from jax.process_index() / jax.process_count() of the cluster.
    config.eval_split = config.train_split
    eval_batches = list(pipeline.make_eval_iterator(config, tokenizer))
    config.num_epochs = 1
    train_batches = list(pipeline.make_train_iterator(config, tokenizer))

    mesh = sharding.make_mesh(sharding.MeshConfig(data=-1, fsdp=1, tensor=1))
    local = eval_batches[0]
    global_batch = pipeline.to_global_batch(local, mesh, sharding.batch_sharding(mesh).spec)
    gathered = multihost_utils.process_allgather(global_batch["input_ids"], tiled=True)
    loss_tokens = int(jax.jit(lambda m: jnp.sum(m))(global_batch["loss_mask"]))
    with open(out, "w") as f:
        json.dump({
            "process_index": jax.process_index(),
            "num_devices": jax.device_count(),
            "eval_texts": [t for b in eval_batches for t in example_texts(b, tokenizer)],
            "num_eval_batches": len(eval_batches),
            "train_texts": [t for b in train_batches for t in example_texts(b, tokenizer)],
            "global_shape": list(global_batch["input_ids"].shape),
            "local_input_ids": local["input_ids"].tolist(),
            "local_loss_tokens": int(local["loss_mask"].sum()),
            "gathered_input_ids": np.asarray(gathered).tolist(),
            "global_loss_tokens": loss_tokens,
        }, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:7])
