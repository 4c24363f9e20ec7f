"""Export a training run's checkpoint as an HF LLaMA directory (safetensors, config, tokenizer):

    python -m alpacare_jax.export_hf --workdir=DIR [--step=N] --out=HF_DIR [--dtype=bfloat16]
    python -m alpacare_jax.export_hf --workdir=LORA_DIR --out=ADAPTER_DIR --peft     # LoRA: a PEFT adapter
    python -m alpacare_jax.export_hf --workdir=LORA_DIR --out=HF_DIR --merge         # LoRA: adapters folded in

Only the weights are restored from the orbax checkpoint (optimizer state stays on disk), directly onto
an FSDP mesh over all devices, so a model larger than one device can be exported; the result loads
with `transformers.AutoModelForCausalLM.from_pretrained(HF_DIR)`. A LoRA run is exported either as a
PEFT adapter directory for its base (`peft.PeftModel.from_pretrained(base_model, ADAPTER_DIR)`; a few MB,
float32 unless `--dtype` says otherwise) or, with `--merge`, as a whole HF model whose weights are
W + scale * A @ B (what the adapted model computes, loadable without peft).
"""

from __future__ import annotations

import argparse
import sys

from alpacare_jax import hf, hf_peft
from alpacare_jax.infer.loading import restore_workdir
from alpacare_jax.model import lora
from alpacare_jax.workdir import Workdir


def export(workdir: str, out: str, *, step: int | None = None, dtype: str = "bfloat16", peft: bool = False,
           merge: bool = False) -> int:
    """Writes the checkpoint at `step` (default: latest) of `workdir` to `out`; returns the step exported.

    A LoRA workdir needs `peft` (the adapter, for the run's `init_from_hf` base) or `merge` (a whole model).
    """
    run = Workdir(workdir)
    is_lora = run.model_config().lora is not None
    if peft and merge:
        raise ValueError("choose one of --peft (the adapter alone) and --merge (a whole model)")
    if (peft or merge) and not is_lora:
        raise ValueError(f"{workdir}: --peft and --merge export LoRA runs; this run trained every weight")
    if is_lora and not (peft or merge):
        raise ValueError(f"{workdir} is a LoRA run: export --peft (a PEFT adapter for its base) or --merge "
                         "(a whole model with the adapters folded in)")
    base = run.training_config().get("init_from_hf", "")
    if peft and not base:
        raise ValueError(f"{workdir}: a PEFT adapter needs an HF base, and this run's base is a random "
                         "initialisation (no init_from_hf); export it with --merge")
    model, step = restore_workdir(workdir, step=step)
    if peft:
        hf_peft.save_adapter(model, out, base=base, tokenizer=run.tokenizer(), dtype=dtype)
    else:
        hf.save_pretrained(lora.merged_model(model), out, dtype=dtype, tokenizer=run.tokenizer())
    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alpacare_jax.export_hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="training run directory (python -m alpacare_jax.train)")
    parser.add_argument("--out", required=True, help="HF model (or PEFT adapter) directory to write")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: bfloat16; "
                        "float32 for a PEFT adapter)")
    parser.add_argument("--peft", action="store_true", help="LoRA run: write a PEFT adapter directory")
    parser.add_argument("--merge", action="store_true", help="LoRA run: write a whole model, adapters folded in")
    args = parser.parse_args(argv)
    dtype = args.dtype or ("float32" if args.peft else "bfloat16")
    try:
        step = export(args.workdir, args.out, step=args.step, dtype=dtype, peft=args.peft, merge=args.merge)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported step {step} of {args.workdir} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
