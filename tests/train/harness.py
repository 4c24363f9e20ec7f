"""Helpers for the tests that train: tiny configs over the `prepared` sample build (tests/conftest.py),
in-process and subprocess runs, restoring a trained model."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import TEST_VOCAB

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.py"


def demo_config(path: Path = DEMO_CONFIG):
    """The config of a configs/*.py file (by default the CPU demo's), as `--config=` would load it."""
    spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def tiny_config(prepared: Path, **overrides):
    """The demo config shrunk for tests: 2-layer 64-wide LLaMA, rows of 256 tokens, metrics every step.

    Every field differing from configs/demo.py can be passed as a `--config.` flag (see cli_overrides),
    so in-process and subprocess runs train the same model.
    """
    c = demo_config()
    c.model.update(vocab_size=TEST_VOCAB, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, max_position_embeddings=256)
    c.tokenizer = str(prepared / "tokenizer")
    c.data.data_dir = str(prepared / "tfds")
    c.data.max_length = 256
    c.data.global_batch_size = 8
    c.data.read_threads = 0
    c.num_train_steps = 4
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_ratio = 0.25
    c.log_every = 1
    c.eval_every = 0
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.export_hf = False
    c.sample_prompt = ""
    for key, value in overrides.items():
        target = c
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return c


def cli_overrides(config) -> list[str]:
    """`--config.a.b=v` flags that make the demo config equal to `config` (for subprocess runs)."""
    flat = []

    def walk(prefix, node):
        for key, value in node.items():
            name = f"{prefix}.{key}"
            if hasattr(value, "items"):
                walk(name, value)
            elif key not in ("no_decay",) and not isinstance(value, (tuple, list)):
                flat.append(f"--config{name}={value}")

    walk("", config)
    return flat


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(config, workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "alpacare_jax.train", f"--config={DEMO_CONFIG}", f"--workdir={workdir}",
            *cli_overrides(config), *extra]


def subprocess_env(num_devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_train(config, workdir: Path, *extra: str, num_devices: int = 8,
              timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_command(config, workdir, *extra), env=subprocess_env(num_devices), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"training exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def restore_model(workdir: Path):
    """(model, step) from a workdir's latest checkpoint, the way every loader rebuilds it."""
    from alpacare_jax.infer.loading import restore_workdir

    return restore_workdir(workdir)


def hf_logits_match(model, hf_dir: Path, prompt: str) -> None:
    """Asserts that transformers, loading `hf_dir` with its tokenizer, gives `model`'s logits on `prompt`."""
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = transformers.AutoTokenizer.from_pretrained(hf_dir)(prompt, return_tensors="np")["input_ids"]
    assert ids.shape[1] > 5
    with torch.no_grad():
        expected = hf_model(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), expected, atol=1e-4, rtol=0)
