"""data_gen: regenerate MedInstruct-52k and judge model outputs against any OpenAI-compatible endpoint.

Standalone: it imports nothing from ``alpacare_jax`` and needs only ``openai``, ``rouge_score``,
``rapidfuzz`` and ``tqdm`` (``keywords`` also ``yake``). Commands: ``python -m data_gen
{instructions,dedup,responses,judge,keywords,contexts}``.
"""

__version__ = "0.1.0"
