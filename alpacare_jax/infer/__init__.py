"""Inference: loading a model (HF directory or training workdir), batched generation, the generate command, serving.

Modules:
  loading     `load_for_inference(path)`: an HF directory or a workdir, on a device mesh, with its tokenizer.
  completion  `Completer`: prompts in, completions out, batched over the KV-cache decoder.
  generate    `python -m alpacare_jax.infer.generate` (`alpacare-generate`): answers for a test set, resumable.
  serve       `python -m alpacare_jax.infer.serve` (`alpacare-serve`): an OpenAI-compatible HTTP server.
"""
