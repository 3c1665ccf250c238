"""Evaluation: the LM Evaluation Harness and MT-Bench with an LLM judge (stages eval-harness and
eval-mtbench), and the pieces the run report reads back.

Modules: ``targets`` (which models are evaluated and where their weights come from),
``harness`` (lm_eval on each model), ``judge_prompts`` (our judge template or FastChat's file),
``mtbench`` (questions, answers, judging, verdict parsing, aggregation). Importing this package
imports neither torch nor lm_eval; the functions that need them import them.
"""
