"""Functional model definitions and checkpoint loading."""

from models.llama import ForwardOut, LlamaConfig, Params, config_from_hf, forward, init_params, unstack_layers
from models.loading import Model, ModelLoadError, load_model

__all__ = ["ForwardOut", "LlamaConfig", "Params", "config_from_hf", "forward", "init_params", "unstack_layers", "Model", "ModelLoadError", "load_model"]
