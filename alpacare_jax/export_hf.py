"""Export a training run's checkpoint as an HF LLaMA directory (safetensors, config, tokenizer):

    python -m alpacare_jax.export_hf --workdir=DIR [--step=N] --out=HF_DIR [--dtype=bfloat16]

Only the weights are restored from the orbax checkpoint (optimizer state stays on disk), directly onto
an FSDP mesh over all devices, so a model larger than one device can be exported; the result loads
with `transformers.AutoModelForCausalLM.from_pretrained(HF_DIR)`.
"""

from __future__ import annotations

import argparse
import sys


def export(workdir: str, out: str, *, step: int | None = None, dtype: str = "bfloat16") -> int:
    """Writes the checkpoint at `step` (default: latest) of `workdir` to `out`; returns the step exported."""
    from alpacare_jax import hf
    from alpacare_jax.infer.loading import restore_workdir, workdir_tokenizer

    model, step = restore_workdir(workdir, step=step)
    hf.save_pretrained(model, out, dtype=dtype, tokenizer=workdir_tokenizer(workdir))
    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alpacare_jax.export_hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="training run directory (python -m alpacare_jax.train)")
    parser.add_argument("--out", required=True, help="HF model directory to write")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16, float16 or float32")
    args = parser.parse_args(argv)
    try:
        step = export(args.workdir, args.out, step=args.step, dtype=args.dtype)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported step {step} of {args.workdir} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
