"""The NAO controller: encoder, predictor, decoder, its training and the embedding-space step."""

from nao_jax.controller.config import ControllerConfig
from nao_jax.controller.model import Controller, l2_normalize
from nao_jax.controller.optimize import Proposal, decode_moved, propose
from nao_jax.controller.train import (ControllerState, capacity_for, init_controller,
                                      normalize_targets, pad_pool, predict_in_chunks, predict_scores,
                                      reconstruct,
                                      reset_optimizer, train_epochs)
