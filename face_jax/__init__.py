"""MvCoM (CVPR 2022) and insightface-style face recognition in JAX/Flax.

models/     IResNet backbones, the cosine classifier, the face model with attribute heads
margins     CosFace / ArcFace / combined margins with per-sample margin vectors
mvcom       the additive multi-variation margin model
meta        the bilevel (learning-to-learn) step and learning-to-reweight
data/       synthetic biased faces (and insightface formats)
evaluate    LFW-protocol verification, TAR@FAR, per-group / per-variation breakdowns
steps       the model and the pure loss / step functions of every method
synthetic_task, real_data_task   batches (+ meta batch, attributes) of each data source
evaluators  per-group / per-variation verification, tables, plots
train       `make_task(config, mesh)` for the generic loop in train_jax
"""
