"""One process of a multi-process run of the `alpacare_jax` backend over the parity tasks (tests only).

    python -m tests.eval.backend_process MODEL DATA_DIR CONFIG_DIR OUT_JSON COORDINATOR NUM_PROCESSES PROCESS_ID

Every process runs the same tasks with the same requests; the harness hands results to process 0 only,
which writes them to OUT_JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(model: str, data_dir: str, config_dir: str, out: str, coordinator: str, num_processes: str,
         process_id: str) -> None:
    import jax

    jax.distributed.initialize(coordinator_address=coordinator, num_processes=int(num_processes),
                               process_id=int(process_id))
    from alpacare_jax.eval.lm_eval_backend import AlpacareJaxLM
    from tests.eval.test_lm_eval_backend import PARITY_TASKS, run_tasks

    assert jax.device_count() == 4 * int(num_processes)
    lm = AlpacareJaxLM(model, batch_size=3, fsdp=-1, tensor=2)  # fsdp 4 x tensor 2 across both processes
    results = run_tasks(lm, PARITY_TASKS, Path(data_dir), Path(config_dir) / f"process{process_id}")
    if results is not None:
        Path(out).write_text(json.dumps({"samples": results["samples"], "results": results["results"]}, default=str))


if __name__ == "__main__":
    main(*sys.argv[1:])
