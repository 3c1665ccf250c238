"""Training: QLoRA/LoRA SFT and DPO on TRL, checkpoints in the run store, merging into full weights.

Everything here imports torch/transformers/trl lazily or at module import; only the stage modules
(bezoar_jobs.stages.sft / .dpo) import it, never the controller or the CLI at import time.
"""
