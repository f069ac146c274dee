"""SIMLA (ECCV 2022) in JAX/Flax: models, objectives, data, downstream tasks, checkpoint import."""
