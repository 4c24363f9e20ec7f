"""Two real JAX processes on localhost read disjoint shards whose union is the split, and their local
batches assemble into one global array."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from alpacare_jax.data.examples import ExampleEncoder

from .conftest import REPO_ROOT

WORKER = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")
NUM_PROCESSES = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_read_disjoint_shards_covering_the_split(tmp_path, sample_data_dir, sp_tokenizer):
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO_ROOT)}
    outs = [tmp_path / f"process{i}.json" for i in range(NUM_PROCESSES)]
    procs = [
        subprocess.Popen([sys.executable, WORKER, str(i), str(NUM_PROCESSES), str(port), str(sample_data_dir),
                          str(sp_tokenizer.model_file.parent), str(outs[i])],
                         env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(NUM_PROCESSES)
    ]
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    results = [json.loads(o.read_text()) for o in outs]
    assert [r["process_index"] for r in results] == [0, 1]
    assert all(r["num_devices"] == 4 for r in results)

    # What the whole split looks like, encoded the same way in this process.
    split = tfds.data_source("medinstruct/medinstruct_52k", split="train", data_dir=sample_data_dir, download=False)
    encode = ExampleEncoder(sp_tokenizer, 512)
    expected = set()
    for record in split:
        ex = encode(record)
        expected.add(sp_tokenizer.decode(np.concatenate([ex["input_ids"], ex["labels"][-1:]])))
    assert len(expected) == len(split)

    # Eval iterator: disjoint shards, union == split, same number of batches on both processes.
    shards = [set(r["eval_texts"]) for r in results]
    assert all(len(s) == len(r["eval_texts"]) for s, r in zip(shards, results))
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] == expected
    assert results[0]["num_eval_batches"] == results[1]["num_eval_batches"]
    # Training iterator, one epoch: disjoint shards inside the split (the last partial batch is dropped).
    train = [set(r["train_texts"]) for r in results]
    assert not train[0] & train[1]
    assert train[0] | train[1] <= expected and len(train[0] | train[1]) >= len(expected) - 2 * 4

    # Global batch: [global_batch, length], rows of process 0 then process 1 (devices are in process order).
    for r in results:
        assert r["global_shape"] == [4, 512]
        assert r["gathered_input_ids"] == results[0]["local_input_ids"] + results[1]["local_input_ids"]
        assert r["global_loss_tokens"] == results[0]["local_loss_tokens"] + results[1]["local_loss_tokens"]
