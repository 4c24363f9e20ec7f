"""Ahead-of-time compile of the train step (or the serving steps) for a TPU slice, on any host: does it fit?

    python -m alpacare_jax.aot --config=configs/llama2_7b.py [--topology=v5p-8] [--config.a.b=v ...]
    python -m alpacare_jax.aot --config=configs/llama2_7b.py --topology=v5e-8 --serve_slots=16 [--serve_length=4096]

Builds the trainer's own program (`train.step.build_train_program`: same mesh, rules, optimizer, state
and batch shardings, same jitted step) over abstract devices of the slice (libtpu, from the `tpu`
extra, compiles for them; no TPU is needed), lowers it with shapes only and compiles it. Prints what
XLA will hold per chip (the arguments, and the peak of all live buffers) against the chip's HBM, and
exits with status 1 when it does not fit. A minute here saves a failed pod launch.

Slice names follow Cloud TPU: v4-N and v5p-N count TensorCores (two per chip), v5e-N and v6e-N count
chips. `--topology` defaults to the config's own `tpu_topology`.

With `--serve_slots=N`, it compiles instead what the server runs for the config's model in bf16 (see
`compile_serve_steps`): the prefill that writes new prompts into free slots and a chunk of decoding steps
over all N slots, each slot holding `--serve_length` positions of KV cache, the model split over every
chip by tensor parallelism; it reports weights and cache per chip and each program's peak.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
from typing import Any

import jax

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Generation:
    """One TPU generation: how its slice names count, its chip grid and its HBM per chip."""

    name: str  # as in slice names and libtpu topology strings: v4, v5p, v5e, v6e
    hbm_gib: float
    cores_per_name_unit: int  # v4/v5p names count TensorCores (2 per chip); v5e/v6e count chips
    dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
    # v4 exposes each TensorCore as a device unless the two are fused ("megacore"), as jax does on v4 VMs.
    chip_config_name: str | None = None


GENERATIONS = {
    g.name: g for g in (
        Generation("v4", 32.0, 2, 3, chip_config_name="megacore"),
        Generation("v5p", 95.0, 2, 3),
        Generation("v5e", 16.0, 1, 2),
        Generation("v6e", 32.0, 1, 2),
    )
}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    name: str  # e.g. "v5p-8"
    generation: Generation
    chips: int

    @property
    def topology_name(self) -> str:
        """libtpu's topology string, e.g. v5p:2x2x1 (the chip grid Cloud TPU gives a slice of this size)."""
        grids = _GRIDS[self.generation.dims]
        if self.chips not in grids:
            raise ValueError(f"{self.name}: no {self.generation.name} slice of {self.chips} chips "
                             f"(known chip counts: {sorted(grids)})")
        return f"{self.generation.name}:{'x'.join(map(str, grids[self.chips]))}"

    @property
    def hbm_bytes(self) -> int:
        return int(self.generation.hbm_gib * GIB)

    def devices(self) -> list:
        from jax.experimental import topologies

        # libtpu takes a host-wide lock meant for processes that own the TPU chips; compiling for
        # abstract devices owns none, so parallel compiles (pytest -n 2, several configs) may share it.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

        kwargs = {}
        if self.generation.chip_config_name:
            kwargs["chip_config_name"] = self.generation.chip_config_name
        topology = topologies.get_topology_desc(platform="tpu", topology_name=self.topology_name, **kwargs)
        devices = list(topology.devices)
        if len(devices) != self.chips:
            raise RuntimeError(f"{self.topology_name} gave {len(devices)} devices, expected {self.chips} chips")
        return devices


_GRIDS = {
    3: {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
        256: (4, 8, 8), 512: (8, 8, 8)},
    2: {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)},
}


def parse_slice(name: str) -> TpuSlice:
    match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip())
    if not match or match.group(1) not in GENERATIONS:
        raise ValueError(f"unknown TPU slice {name!r}; expected e.g. v4-16, v5p-8, v5e-16, v6e-8 "
                         f"(generations: {sorted(GENERATIONS)})")
    generation, count = GENERATIONS[match.group(1)], int(match.group(2))
    if count % generation.cores_per_name_unit:
        raise ValueError(f"{name}: {generation.name} slice names count TensorCores, two per chip")
    return TpuSlice(name, generation, count // generation.cores_per_name_unit)


# ---- compile and measure --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Per-chip bytes of one compiled step, as XLA's buffer assignment reports them.

    `peak` is XLA's own peak of live bytes per chip, arguments included (`peak_memory_in_bytes`, within 1% of
    the total of XLA's buffer-assignment memory report). Adding up the argument, output and
    temporary sizes instead overstates it by a fifth to a quarter (40.4 against 34.0 GiB for LLaMA-1 7B on a
    v5p-8). When XLA refuses the program for lack of HBM, `refusal` holds its message and `peak` the
    bytes the message quotes, which its memory report shows to be arguments plus temporaries too.
    """

    config: str
    tpu: TpuSlice
    arguments: int  # train state and batch shards (the state is donated: reused for the outputs)
    peak: int
    compile_seconds: float
    # Pallas TPU kernel calls in the lowered step (splash attention's forward and backward kernels):
    # 0 with `attention_impl="splash"` would mean the step silently fell back to the XLA attention.
    pallas_kernels: int = 0
    # All-gathers in the compiled step that assemble a whole decoder-layer weight matrix, and how many
    # such matrices a layer has (see `count_weight_gathers`); 0 when XLA refused the program.
    weight_gathers: int = 0
    layer_weights: int = 0
    refusal: str = ""

    @property
    def fits(self) -> bool:
        return not self.refusal and self.peak <= self.tpu.hbm_bytes

    HEADER = ("| config | topology | chips | args GiB | peak GiB | HBM GiB | fits | compile s |\n"
              "|---|---|---|---|---|---|---|---|")

    def row(self) -> str:
        g = lambda n: f"{n / GIB:.1f}"
        return (f"| {self.config} | {self.tpu.name} | {self.tpu.chips} | {g(self.arguments)} | {g(self.peak)} "
                f"| {self.tpu.generation.hbm_gib:g} | {'yes' if self.fits else 'NO'} | {self.compile_seconds:.0f} |")


_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": GIB, "T": 1024 ** 4}


def _refused_bytes(message: str) -> int:
    """The bytes XLA's out-of-HBM error quotes ("... HLO temporaries (315.16G) exceeds ..."), or 0."""
    match = re.search(r"temporaries \(([\d.]+)([KMGT]?)\)", message)
    return int(float(match.group(1)) * _UNITS[match.group(2)]) if match else 0


def count_weight_gathers(hlo: str, params: Any) -> tuple[int, int]:
    """(all-gathers in compiled `hlo` whose result is one whole decoder-layer weight matrix, how many
    weight matrices a layer has).

    Under FSDP each layer's weights are gathered once for the forward pass and once for the backward
    pass (which reruns the forward when rematerialising), so the first number should be at most twice
    the second; more means XLA gathers some weight again, e.g. in another layout for another matmul.
    Whole weights are recognised by their element count.
    """
    sizes = [math.prod(leaf.shape[1:]) for leaf in jax.tree.leaves(params["layers"]) if leaf.ndim >= 3]
    # An all-gather's result: "= bf16[5120,13824]{...} all-gather(", or a tuple of them when XLA combined some.
    results = re.findall(r"= ([^=]*?) all-gather(?:-start)?\(", hlo)
    gathered = [math.prod(int(d) for d in dims.split(",") if d)
                for result in results for dims in re.findall(r"\w+\[([\d,]*)\]", result)]
    return sum(1 for n in gathered if n in sizes), len(sizes)


def _shard_bytes(abstract: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard per leaf)."""
    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
               for leaf in jax.tree.leaves(abstract))


def abstract_batch(config, program) -> dict:
    """Shape-only global batch with the trainer's batch sharding (the data pipeline's fields, int32)."""
    import jax.numpy as jnp

    from alpacare_jax import sharding as sharding_lib
    from alpacare_jax.data.pipeline import BATCH_KEYS

    sharding = sharding_lib.batch_sharding(program.setup.mesh, program.setup.rules)
    shape = (config.data.global_batch_size, config.data.max_length)
    return {key: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding) for key in BATCH_KEYS}


def model_config_for_aot(config):
    """The config's model; a not-yet-downloaded `init_from_hf` checkpoint falls back to the preset.

    Shipped configs name their HF checkpoint by a placeholder path; the presets are exactly those
    checkpoints' architectures, so compiling does not need the weights to be present.
    """
    from etils import epath

    from alpacare_jax.hf import CONFIG_FILE
    from alpacare_jax.train.config import llama_config

    if config.init_from_hf and not (epath.Path(config.init_from_hf) / CONFIG_FILE).exists():
        config = config.copy_and_resolve_references()
        config.init_from_hf = ""
    return llama_config(config)


def compile_train_step(config, tpu: TpuSlice, name: str = "") -> MemoryReport:
    """Compiles the trainer's train step for `tpu` from shapes alone and reads its memory use."""
    from alpacare_jax.train.step import build_train_program

    model_config = model_config_for_aot(config)
    if config.data.global_batch_size % config.grad_accum_steps:
        raise ValueError(f"data.global_batch_size={config.data.global_batch_size} is not divisible by "
                         f"grad_accum_steps={config.grad_accum_steps}")
    # The schedule's length changes no shapes; any step count compiles the same program.
    total_steps = config.num_train_steps or 1000
    program = build_train_program(config, model_config, total_steps, devices=tpu.devices())
    args = (program.setup.abstract_state, abstract_batch(config, program))
    state_bytes = _shard_bytes(args)
    if state_bytes > tpu.hbm_bytes:  # XLA would refuse it too, after minutes of compiling (70B: 1 TiB of state)
        return MemoryReport(name, tpu, arguments=state_bytes, peak=state_bytes, compile_seconds=0.0,
                            refusal=f"the train state and batch alone need {state_bytes / GIB:.1f} GiB per chip")
    start = time.perf_counter()
    lowered = program.train_step.lower(*args)
    pallas_kernels = lowered.as_text().count("tpu_custom_call")
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:  # XLA refuses programs that cannot fit in HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        message = str(e).strip().splitlines()[0]
        return MemoryReport(name, tpu, arguments=_shard_bytes(args), peak=_refused_bytes(message),
                            compile_seconds=time.perf_counter() - start, pallas_kernels=pallas_kernels,
                            refusal=message)
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    # The model's weights (with LoRA the frozen base: its adapters are too small to matter).
    weights = program.setup.abstract_state.frozen or program.setup.abstract_state.params
    weight_gathers, layer_weights = count_weight_gathers(compiled.as_text(), weights)
    return MemoryReport(name, tpu, arguments=memory.argument_size_in_bytes, peak=memory.peak_memory_in_bytes,
                        compile_seconds=seconds, pallas_kernels=pallas_kernels,
                        weight_gathers=weight_gathers, layer_weights=layer_weights)


# ---- serving --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ServeReport:
    """Per-chip bytes of the two serving programs (`model.decode.DecodeSlots`'s prefill-and-insert and
    chunk of decoding steps), as XLA's buffer assignment reports them for one slice.

    Both programs take the decode state (the KV cache of every slot) donated, so it exists once; `peak`
    is XLA's peak of live bytes per chip, arguments (weights and state) included. When weights and cache
    alone exceed the chip's HBM nothing is compiled (`refusal` says so), as when XLA refuses a program.
    """

    config: str
    tpu: TpuSlice
    slots: int
    max_length: int  # KV-cache positions per slot: the longest prompt + answer served
    prefill_tokens: int
    weights: int
    cache: int
    prefill_peak: int = 0
    decode_peak: int = 0
    compile_seconds: float = 0.0
    refusal: str = ""

    @property
    def peak(self) -> int:
        return max(self.prefill_peak, self.decode_peak, self.weights + self.cache)

    @property
    def fits(self) -> bool:
        return not self.refusal and self.peak <= self.tpu.hbm_bytes

    HEADER = ("| model | topology | chips | slots | context | weights GiB | KV cache GiB | prefill peak GiB "
              "| decode peak GiB | HBM GiB | fits |\n|---|---|---|---|---|---|---|---|---|---|---|")

    def row(self) -> str:
        g = lambda n: f"{n / GIB:.1f}" if n else "-"
        return (f"| {self.config} | {self.tpu.name} | {self.tpu.chips} | {self.slots} | {self.max_length} "
                f"| {g(self.weights)} | {g(self.cache)} | {g(self.prefill_peak)} | {g(self.decode_peak)} "
                f"| {self.tpu.generation.hbm_gib:g} | {'yes' if self.fits else 'NO'} |")


def serving_model_config(config):
    """The config's model as served: bf16 weights and compute (no fp32 master copy to keep)."""
    return model_config_for_aot(config).replace(param_dtype="bfloat16", dtype="bfloat16")


def compile_serve_steps(model_config, tpu: TpuSlice, *, slots: int, max_length: int, prefill_tokens: int = 1024,
                        chunk_tokens: int = 8, name: str = "") -> ServeReport:
    """Compiles the server's prefill and decoding programs for `tpu` from shapes alone; reads their memory.

    The mesh is tensor parallelism over every chip (heads, KV heads, MLP and vocabulary split; the slots
    and everything else whole on each chip), which keeps a decoding step free of weight all-gathers. The
    decoding chunk is compiled for the widest attention window (the whole cache), the prefill for
    `prefill_tokens` packed prompt tokens: the largest of their kinds.
    """
    import jax.numpy as jnp
    from flax import nnx

    from alpacare_jax import sharding as sharding_lib
    from alpacare_jax.model import decode
    from alpacare_jax.train.state import abstract_model, with_shardings

    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(data=1, fsdp=1, tensor=tpu.chips), tpu.devices())
    rules = sharding_lib.DEFAULT_RULES
    graphdef, abstract_state = abstract_model(model_config)
    params = with_shardings(nnx.to_pure_dict(abstract_state), sharding_lib.param_shardings(abstract_state, mesh, rules))
    whole = sharding_lib.replicated(mesh)
    abstract = jax.eval_shape(decode._empty_slots, model_config, slots, max_length)
    cache_sharding = sharding_lib.logical_sharding(mesh, abstract.cache.axes, rules)
    state = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=whole), abstract)
    state = state.replace(cache=state.cache.replace(
        k=jax.ShapeDtypeStruct(abstract.cache.k.shape, abstract.cache.k.dtype, sharding=cache_sharding),
        v=jax.ShapeDtypeStruct(abstract.cache.v.shape, abstract.cache.v.dtype, sharding=cache_sharding)))
    report = ServeReport(name, tpu, slots, max_length, prefill_tokens, weights=_shard_bytes(params),
                         cache=_shard_bytes((state.cache.k, state.cache.v)))
    if report.weights + report.cache > tpu.hbm_bytes:
        return dataclasses.replace(report, refusal=f"weights and KV cache alone need "
                                                   f"{(report.weights + report.cache) / GIB:.1f} GiB per chip")

    def spec(shape, dtype=jnp.int32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=whole)

    settings = jax.tree.map(lambda x: spec(x.shape, x.dtype), decode.RowSettings.of([], [], slots))
    eos = spec((len(model_config.eos_token_ids),))
    packed = [spec((1, prefill_tokens))] * 3 + [spec((slots,))] * 3
    start = time.perf_counter()
    peaks = []
    with sharding_lib.activate(mesh, rules):
        for program, args in ((decode._insert_program, (graphdef, params, state, *packed, settings, eos)),
                              (decode._advance_program, (graphdef, params, state, eos, chunk_tokens, max_length))):
            try:
                t0 = time.perf_counter()
                lowered = program.lower(*args)
                t1 = time.perf_counter()
                compiled = lowered.compile()
                if os.environ.get("AOT_DUMP"):
                    print(program.__name__, f"lower {t1 - t0:.1f}s compile {time.perf_counter() - t1:.1f}s")
            except jax.errors.JaxRuntimeError as e:  # XLA refuses programs that cannot fit in HBM
                if "RESOURCE_EXHAUSTED" not in str(e):
                    raise
                return dataclasses.replace(report, compile_seconds=time.perf_counter() - start,
                                           refusal=str(e).strip().splitlines()[0])
            peaks.append(compiled.memory_analysis().peak_memory_in_bytes)
            if os.environ.get("AOT_DUMP"):
                open(f"{os.environ['AOT_DUMP']}.{program.__name__}.hlo", "w").write(compiled.as_text())
    return dataclasses.replace(report, prefill_peak=peaks[0], decode_peak=peaks[1],
                               compile_seconds=time.perf_counter() - start)


# ---- command line ---------------------------------------------------------------------------------------

def run_serve(config, topology: str, name: str, *, slots: int, max_length: int, prefill_tokens: int) -> int:
    """Compiles the serving steps, prints the per-chip table row; 0 if they fit the chip's HBM, else 1."""
    tpu = parse_slice(topology or config.get("tpu_topology", ""))
    print(f"compiling the {name or 'config'} serving steps for {tpu.name} ({tpu.chips} chips, {slots} slots of "
          f"{max_length} positions) ...", flush=True)
    report = compile_serve_steps(serving_model_config(config), tpu, slots=slots, max_length=max_length,
                                 prefill_tokens=min(prefill_tokens, max_length), name=name)
    print(ServeReport.HEADER)
    print(report.row(), flush=True)
    if not report.fits:
        print(f"does NOT fit: {report.peak / GIB:.1f} GiB per chip needed, {tpu.generation.hbm_gib:g} GiB of HBM "
              f"per {tpu.generation.name} chip", file=sys.stderr)
        if report.refusal:
            print(f"refused: {report.refusal}", file=sys.stderr)
        return 1
    return 0


def run(config, topology: str = "", name: str = "") -> int:
    """Compiles, prints the per-chip table row; 0 if it fits the chip's HBM, else 1."""
    topology = topology or config.get("tpu_topology", "")
    if not topology:
        raise ValueError("no --topology given and the config sets no tpu_topology")
    tpu = parse_slice(topology)
    print(f"compiling the {name or 'config'} train step for {tpu.name} "
          f"({tpu.chips} chips, {tpu.topology_name}) ...", flush=True)
    report = compile_train_step(config, tpu, name)
    print(MemoryReport.HEADER)
    print(report.row())
    print(f"Pallas TPU kernel calls in the step: {report.pallas_kernels}", flush=True)
    if report.layer_weights:
        print(f"all-gathers of whole layer weights: {report.weight_gathers} for {report.layer_weights} weight "
              f"matrices per layer (at most 2 each: forward and backward)", flush=True)
    if not report.fits:
        print(f"does NOT fit: {report.peak / GIB:.1f} GiB per chip needed, "
              f"{tpu.generation.hbm_gib:g} GiB of HBM per {tpu.generation.name} chip", file=sys.stderr)
        if report.refusal:
            print(f"refused: {report.refusal}", file=sys.stderr)
        return 1
    return 0


def cli() -> None:
    """The `alpacare-aot` command: this host compiles for a TPU topology, so it needs no TPU backend."""
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)",
                                                  lock_config=True)
    topology_flag = flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p-8 (default: config.tpu_topology)")
    slots_flag = flags.DEFINE_integer("serve_slots", 0, "compile the serving steps for this many decode slots "
                                      "(0: the train step)")
    length_flag = flags.DEFINE_integer("serve_length", 4096, "KV-cache positions per slot (prompt + answer)")
    prefill_flag = flags.DEFINE_integer("serve_prefill", 1024, "prompt tokens one prefill packs at most")
    flags.mark_flags_as_required(["config"])

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        path = config_flags.get_config_filename(flags.FLAGS["config"])
        name = path.rsplit("/", 1)[-1].removesuffix(".py")
        if slots_flag.value:
            sys.exit(run_serve(config_flag.value, topology_flag.value or "", name, slots=slots_flag.value,
                               max_length=length_flag.value, prefill_tokens=prefill_flag.value))
        sys.exit(run(config_flag.value, topology_flag.value or "", name))

    app.run(main)


if __name__ == "__main__":
    cli()
