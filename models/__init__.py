"""The functional model: Llama-family forward, the fixed-size KV-cache pytree, reference attention, loading."""

from models.llama import (ForwardOut, LlamaConfig, Params, config_from_hf, default_layout, forward, init_params, stack_layers,
                          unstack_layers, with_layout)
from models.loading import Model, ModelLoadError, load_model, place_params

__all__ = ["ForwardOut", "LlamaConfig", "Params", "config_from_hf", "forward", "init_params", "default_layout", "stack_layers", "unstack_layers", "with_layout", "Model", "ModelLoadError", "load_model", "place_params"]
