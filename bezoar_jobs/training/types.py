"""Names for the objects of untyped machine-learning libraries that cross our function signatures.

torch, transformers, trl and peft are imported inside functions (so importing a stage stays cheap)
and type-checked as ``Any`` (see pyproject.toml); these aliases say what a parameter is.
"""

from __future__ import annotations

from typing import Any, TypeAlias

Trainer: TypeAlias = Any  # a TRL trainer (a transformers.Trainer subclass)
Tokenizer: TypeAlias = Any  # a transformers tokenizer (PreTrainedTokenizerBase)
Model: TypeAlias = Any  # a transformers model (PreTrainedModel), possibly PEFT-wrapped
Config: TypeAlias = Any  # a TRL/PEFT config object (SFTConfig, DPOConfig, LoraConfig)
