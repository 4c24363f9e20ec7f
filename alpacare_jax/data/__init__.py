"""MedInstruct data: TFDS builder, tokenizers, the Alpaca prompt, and the grain SFT input pipeline.

Modules (import what you need; importing this package loads nothing heavy):
  prompts      `format_prompt(instruction, input)`: the exact Alpaca/AlpaCare template.
  tokenizer    `load_tokenizer(path)`, `train_tokenizer(...)`: sentencepiece and HF tokenizer.json backends.
  records      reading and checking the AlpaCare source files (bad records name file, index, field).
  medinstruct  the TFDS builder (`medinstruct/medinstruct_52k`, `/medinstruct_test`, `/icliniq`).
  build        `python -m alpacare_jax.data.build --source=... --data_dir=... [--config=...]`.
  examples     one record -> input_ids / labels / loss_mask (prompt masked out).
  pipeline     train / eval iterators of host-local batches, `to_global_batch`, `default_data_config`.
  sample/medinstruct_sample.json   an original 120-record sample in MedInstruct-52k format.
"""

from pathlib import Path

SAMPLE_JSON = Path(__file__).resolve().parent / "sample" / "medinstruct_sample.json"
