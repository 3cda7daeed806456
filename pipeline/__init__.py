"""refusal-directions: a declarative pipeline for refusal-direction experiments.

One module per pipeline stage (prompts, activations, directions, generate, score,
aggregate); shared pieces live in config, models, templates, architecture,
interventions and schemas.
"""
