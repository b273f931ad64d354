"""Greedy generation equals transformers' generate: tiny random checkpoints and the real SmolLM2."""

import dataclasses

import numpy as np
import torch

from adore_jax import engine
from models.loading import load_hf_dir

N_NEW = 32


def _hf_greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_equals_transformers_tiny(tiny_hf_checkpoints, tiny_name):
    from transformers import AutoModelForCausalLM

    path = tiny_hf_checkpoints[tiny_name]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg, params = load_hf_dir(path)
    cfg = dataclasses.replace(cfg, eos_token_ids=())  # random models: no early stop on either side
    prompt = np.random.default_rng(0).integers(3, cfg.vocab_size, 9).tolist()
    assert engine.generate(params, cfg, [prompt], N_NEW) == [_hf_greedy(hf, prompt, N_NEW)]


def test_greedy_equals_transformers_smollm2(smollm2_model, hf_smollm2):
    tok = smollm2_model.tokenizer
    prompt = tok("The three primary colors are")["input_ids"]
    cfg = dataclasses.replace(smollm2_model.cfg, eos_token_ids=())
    ours = engine.generate(smollm2_model.params, cfg, [prompt], N_NEW)[0]
    assert ours == _hf_greedy(hf_smollm2, prompt, N_NEW)
    assert len(tok.decode(ours).split()) > 5  # real text, not a degenerate loop of one id
