"""The lm-evaluation-harness model backend `alpacare_jax`: the harness's tasks scored by our JAX model.

    lm_eval --model alpacare_jax --model_args model=HF_DIR_OR_WORKDIR,batch_size=32 --tasks pubmedqa

It loads a model the way every other command does (`loading.load_model`: an HF directory or a training
workdir) onto a mesh from `fsdp` / `tensor` / `data` model args, and answers the harness's three request
types so that results equal the harness's own `hf` backend on the HF export of the same weights:

- `loglikelihood`: the harness's tokenisation rules (`TemplateLM._encode_pair`: BOS, trailing spaces of
  the context moved into the continuation), contexts truncated from the left at the model's length,
  requests sorted longest first and scored in fixed-shape batches. Requests whose model input is the same
  (the choices of a multiple-choice question with one-token answers, " A" .. " D" or " yes" / " no") share
  one row: the row's last position scores every candidate's last token at once.
- `loglikelihood_rolling`: the harness's disjoint rolling windows, all windows of all documents batched.
- `generate_until`: the KV-cache decoder (`alpacare_jax.model.generate`), stop strings cut afterwards as
  the harness does, `max_gen_toks` from the task or the model args.

Multi-host (a TPU pod): every process runs the same command with the same requests; the batch is one
global array over all chips and every process gets all results back. The harness is told it runs in one
"rank" (it must not split the requests) and, as under tensor-parallel launchers, only the process whose
LOCAL_RANK is 0 writes results.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm.auto import tqdm

from alpacare_jax import sharding
from alpacare_jax.infer.loading import LoadedModel, load_model
from alpacare_jax.model import SamplingConfig, generate
from alpacare_jax.model.decode import bucket

BACKEND_NAME = "alpacare_jax"
DEFAULT_MAX_GEN_TOKS = 256  # the harness's default for its `hf` backend


@functools.partial(jax.jit, static_argnames=("graphdef", "span"))
def _score_rows(graphdef, state, input_ids, last_index, candidates, span: int):
    """Per row, over its last `span` positions: log p(next input token) and the argmax; and log p(candidate)
    at the last position.

    input_ids [B, T] (right-padded); last_index [B] (each row's last real position); candidates [B, K].
    Only the scored positions go through the output projection (for a one-token answer, one position per
    row: the [vocab x embed] projection is a large share of a forward), and only small arrays leave the
    device, never [B, T, vocab] logits.
    """
    model = nnx.merge(graphdef, state)
    hidden, _ = model.hidden_states(input_ids)  # [B, T, E]
    scored = jnp.maximum(last_index[:, None] - span + 1 + jnp.arange(span), 0)  # [B, span], ends at last_index
    hidden = jnp.take_along_axis(hidden, scored[..., None], axis=1)
    logits = jnp.einsum("bpe,ev->bpv", hidden, model.head_weight().astype(model.config.dtype),
                        preferred_element_type=jnp.float32)
    logits = sharding.constrain(logits, ("batch", "length", "vocab"))
    log_norm = jax.nn.logsumexp(logits, axis=-1)
    next_ids = jnp.take_along_axis(input_ids, jnp.minimum(scored + 1, input_ids.shape[1] - 1), axis=1)
    token_logprobs = jnp.take_along_axis(logits, next_ids[..., None], axis=-1)[..., 0] - log_norm
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    candidate_logprobs = jnp.take_along_axis(logits[:, -1], candidates, axis=-1) - log_norm[:, -1:]
    return token_logprobs, greedy, candidate_logprobs


@dataclasses.dataclass
class _Row:
    """One model input shared by every request whose (context + continuation)[:-1] it is."""

    tokens: tuple[int, ...]
    candidates: list[int] = dataclasses.field(default_factory=list)  # distinct last continuation tokens
    span: int = 1  # the longest continuation scored on this row


def _global_array(host: np.ndarray, mesh: Mesh) -> jax.Array:
    """`host` (the same on every process) as one array with its rows over the mesh's batch axes."""
    spec = sharding.batch_sharding(mesh).spec
    named = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec[: host.ndim]))
    return jax.make_array_from_callback(host.shape, named, lambda index: host[index])


def _to_host(x: jax.Array) -> np.ndarray:
    if not x.is_fully_addressable:  # several processes: every one gets all rows
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


@register_model(BACKEND_NAME)
class AlpacareJaxLM(TemplateLM):
    """lm-evaluation-harness `LM` over an AlpaCare-JAX model (see the module docstring).

    Model args (`--model_args k=v,...`): model (HF dir or workdir, required), step, dtype, batch_size
    (rows per forward, default 16), max_length (default: the model's context), max_gen_toks (default 256),
    data / fsdp / tensor (mesh shape over all devices; default FSDP over all of them).
    """

    def __init__(self, model: str | LoadedModel, *, step: int | None = None, dtype: str | None = None,
                 batch_size: int | str | None = 16, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, data: int = 1, fsdp: int = -1, tensor: int = 1,
                 mesh: Mesh | None = None, **harness_args):
        super().__init__()
        # The harness passes its generic CLI settings too (device, max_batch_size): devices come from the mesh.
        harness_args.pop("device", None)
        harness_args.pop("max_batch_size", None)
        if harness_args:
            raise TypeError(f"{BACKEND_NAME}: unknown model args {sorted(harness_args)}")
        if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
            batch_size = 16  # fixed shapes compile once; "auto" probing would compile a program per guess
        self.mesh = mesh or sharding.make_mesh(sharding.MeshConfig(data=int(data), fsdp=int(fsdp),
                                                                   tensor=int(tensor)))
        self.loaded = model if isinstance(model, LoadedModel) else load_model(
            model, step=step, dtype=dtype, mesh=self.mesh)
        self.tokenizer = self.loaded.tokenizer
        self._batch_size = int(batch_size)
        self._max_length = int(max_length or self.loaded.model.config.max_position_embeddings)
        self._max_gen_toks = int(max_gen_toks)
        self._graphdef, self._state = nnx.split(self.loaded.model)
        if jax.process_count() > 1:
            # Every process computes every request (the model spans all processes' chips); the harness
            # lets only LOCAL_RANK 0 aggregate and write, its convention for tensor-parallel launches.
            os.environ["LOCAL_RANK"] = str(jax.process_index())

    # ---- what the harness asks of a model ---------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.loaded.name

    def get_model_info(self) -> dict:
        return {"model_name": self.loaded.name, "model_step": self.loaded.step,
                "model_dtype": self.loaded.model.config.dtype, "mesh": dict(self.mesh.shape)}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """As the `hf` backend with a LLaMA tokenizer: BOS first unless told not to or already in the text."""
        bos_text = self.tokenizer.decode([self.prefix_token_id], skip_special_tokens=False)
        if add_special_tokens is None:
            add_special_tokens = not string.startswith(bos_text)
        return self.tokenizer.encode(string, bos=add_special_tokens)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens)

    @property
    def _progress(self) -> bool:
        return jax.process_index() == 0

    # ---- log-likelihoods ----------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(sum of log p(continuation), whether greedy decoding gives it) per (key, context, continuation)."""
        rows: dict[tuple[int, ...], _Row] = {}
        placed = []  # per request: (its row, its continuation)
        for _, context, continuation in requests:
            if not context or not continuation or len(continuation) > self.max_length:
                raise ValueError(f"{BACKEND_NAME}: a request needs a context and 1..{self.max_length} "
                                 f"continuation tokens, got {len(context)} and {len(continuation)}")
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]  # truncate from the left
            key = tuple(whole[:-1])
            row = rows.setdefault(key, _Row(key))
            if continuation[-1] not in row.candidates:
                row.candidates.append(continuation[-1])
            row.span = max(row.span, len(continuation))
            placed.append((row, list(continuation)))

        ordered = sorted(rows.values(), key=lambda r: (-len(r.tokens), r.tokens))  # longest first, as `hf`
        scores: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        bar = tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm or not self._progress)
        members = collections.Counter(id(row) for row, _ in placed)
        for begin in range(0, len(ordered), self.batch_size):
            chunk = ordered[begin:begin + self.batch_size]
            for row, result in zip(chunk, self._score_chunk(chunk)):
                scores[id(row)] = result
            bar.update(sum(members[id(row)] for row in chunk))
        bar.close()

        results = []
        for (key, _, _), (row, continuation) in zip(requests, placed):
            token_logprobs, greedy, candidate_logprobs = scores[id(row)]  # over the row's last positions
            n = len(continuation)
            # The last n positions predict the continuation: all but the last of its tokens are also in the
            # input; the last one is one of the row's candidates.
            picked = np.append(token_logprobs[len(token_logprobs) - n:-1],
                               candidate_logprobs[row.candidates.index(continuation[-1])])
            logprob = float(np.sum(picked, dtype=np.float64))
            is_greedy = bool(np.array_equal(greedy[len(greedy) - n:], continuation))
            answer = (logprob, is_greedy)
            results.append(answer)
            if key is not None:  # rolling windows come without a key: cached per document instead
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def _score_chunk(self, chunk: Sequence[_Row]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """One forward over up to batch_size rows, padded to fixed shapes so few programs are compiled."""
        shards = self.mesh.shape.get("data", 1) * self.mesh.shape.get("fsdp", 1)
        batch = -(-self.batch_size // shards) * shards
        length = bucket(max(len(r.tokens) for r in chunk))
        width = bucket(max(len(r.candidates) for r in chunk), (1, 2, 4, 8, 16, 32, 64))
        span = min(bucket(max(r.span for r in chunk), (1, 2, 4, 8, 16, 32, 64, 128)), length)
        input_ids = np.zeros((batch, length), np.int32)
        last_index = np.zeros((batch,), np.int32)
        candidates = np.zeros((batch, width), np.int32)
        for i, row in enumerate(chunk):
            input_ids[i, :len(row.tokens)] = row.tokens
            last_index[i] = len(row.tokens) - 1
            candidates[i, :len(row.candidates)] = row.candidates
        with sharding.activate(self.mesh):
            outputs = _score_rows(self._graphdef, self._state, _global_array(input_ids, self.mesh),
                                  _global_array(last_index, self.mesh), _global_array(candidates, self.mesh),
                                  span)
        token_logprobs, greedy, candidate_logprobs = (_to_host(x) for x in outputs)
        return [(token_logprobs[i], greedy[i], candidate_logprobs[i]) for i in range(len(chunk))]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each document over the harness's disjoint windows of max_length tokens."""
        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(text)
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ---- generation ---------------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when the task asks) continuations, cut at the task's stop strings."""
        eos_text = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        model = self.loaded.model
        eos_ids = tuple(dict.fromkeys((*model.config.eos_token_ids, self.eot_token_id)))
        encoded = {}
        for req in requests:
            context = req.args[0]
            if context not in encoded:
                encoded[context] = self.tok_encode(context)
        collator = Collator([req.args for req in requests], sort_fn=lambda a: (-len(encoded[a[0]]), a[0]),
                            group_by="gen_kwargs", group_fn=lambda a: a[1])
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or not self._progress)
        results = []
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen_toks = kwargs.pop("max_gen_toks")
            budget = self.max_length - max_gen_toks
            if budget <= 0:
                raise ValueError(f"{BACKEND_NAME}: max_gen_toks={max_gen_toks} leaves no room for a prompt in "
                                 f"the model's {self.max_length} positions")
            sampling = SamplingConfig(max_new_tokens=max_gen_toks, temperature=float(kwargs.get("temperature", 0.0)),
                                      top_p=float(kwargs.get("top_p") or 1.0), top_k=int(kwargs.get("top_k") or 0),
                                      seed=int(kwargs.get("seed") or 0))
            prompts = [encoded[c][-budget:] for c in contexts]  # left truncation, as `hf`
            for context, gen_kwargs, tokens in zip(contexts, all_kwargs, generate(model, prompts, sampling,
                                                                                  eos_ids=eos_ids)):
                if tokens and tokens[-1] in eos_ids:
                    tokens = tokens[:-1]
                text = postprocess_generated_text(self.tok_decode(tokens), stop=until, think_end_token=None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                bar.update(1)
        bar.close()
        return collator.get_original(results)
