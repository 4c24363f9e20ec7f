"""data_gen: regenerate MedInstruct-52k and judge model outputs against any OpenAI-compatible endpoint.

Standalone: it imports nothing from ``alpacare_jax`` and needs only ``openai``, ``rouge_score``,
``rapidfuzz`` and ``tqdm``. Commands: ``python -m data_gen {instructions,dedup,responses,judge}``.
"""

__version__ = "0.1.0"
