"""SIMLA networks: ViT, the three-mode BERT, heads, momentum copies and queues."""

from simla_jax.models.momentum import MOMENTUM_MODULES, ema_update, init_momentum, init_queues
from simla_jax.models.simla import (SIMLA, abstract_params, clamp_temperature, count_params,
                                    dummy_inputs, init_params, l2_normalize)

__all__ = ["MOMENTUM_MODULES", "SIMLA", "abstract_params", "clamp_temperature", "count_params",
           "dummy_inputs", "ema_update", "init_momentum", "init_params", "init_queues",
           "l2_normalize"]
