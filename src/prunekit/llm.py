"""Causal language models: calibration sequences from text, decoder-layer blocks, samples.

``prunekit.prune`` already calibrates block by block; for a decoder LLM the blocks are its
decoder layers, and each layer's inputs are captured with the keyword arguments the model
passes it (attention mask, position ids, rotary embeddings). This module builds the pieces a
user needs around that call and checks them early, before the model is touched::

    batches = pk.llm.text_calibration(tokenizer, text, seq_len=256, n_sequences=64, model=model)
    pk.prune(model, batches, sparsity=0.5, method="sparsegpt", blocks=pk.llm.decoder_blocks(model))
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's config allows, or None when it does not say."""
    config = getattr(model, "config", None)
    for key in _POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seq_len(model: nn.Module | None, seq_len: int) -> None:
    """Raise a ValueError when ``seq_len`` is not a usable sequence length for ``model``."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer of at least 2, got {seq_len!r}")
    limit = max_positions(model) if model is not None else None
    if limit is not None and seq_len > limit:
        raise ValueError(f"seq_len={seq_len} is above the model's limit of {limit} positions "
                         f"(config.max_position_embeddings); pass seq_len <= {limit}")


def tokenize(tokenizer: Any, text: str | torch.Tensor) -> torch.Tensor:
    """One flat tensor of token ids (no special tokens added); a tensor passes through."""
    if isinstance(text, torch.Tensor):
        return text.reshape(-1).long()
    if not isinstance(text, str):
        raise TypeError(f"text must be a string or a tensor of token ids, got {type(text).__name__}")
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].reshape(-1)


def text_calibration(tokenizer: Any, text: str | torch.Tensor, *, seq_len: int = 256, n_sequences: int = 64,
                     batch_size: int = 8, model: nn.Module | None = None) -> list[dict[str, Any]]:
    """Calibration batches for a causal LM: ``n_sequences`` consecutive, non-overlapping windows
    of ``seq_len`` tokens, in batches of ``batch_size`` as ``{"input_ids", "use_cache": False}``.

    The defaults (64 x 256) are modest on purpose: memory grows with their product, never with
    the model's context window. Raises a ValueError for text shorter than one sequence or a
    ``seq_len`` above the model's limit (pass ``model`` to check it)."""
    check_seq_len(model, seq_len)
    for name, value in (("n_sequences", n_sequences), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    ids = tokenize(tokenizer, text)
    available = ids.numel() // seq_len
    if available == 0:
        raise ValueError(f"the calibration text has {ids.numel()} tokens, fewer than one sequence of "
                         f"seq_len={seq_len}; pass more text or a shorter seq_len")
    if available < n_sequences:
        warnings.warn(f"the calibration text holds only {available} sequences of {seq_len} tokens, "
                      f"not the {n_sequences} asked for; using {available}", stacklevel=2)
    n = min(n_sequences, available)
    seqs = ids[: n * seq_len].view(n, seq_len)
    return [{"input_ids": b, "use_cache": False} for b in seqs.split(batch_size)]


def decoder_blocks(model: nn.Module) -> list[str]:
    """Names of the decoder layers, in order: the ``nn.ModuleList`` holding
    ``config.num_hidden_layers`` modules (llama/mistral ``model.layers``, gpt ``transformer.h``,
    neox ``gpt_neox.layers``...). Raises a ValueError naming the fix when there is none."""
    config = getattr(model, "config", None)
    expected = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    candidates = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0
        and (expected is None or len(module) == expected)
    ]
    if not candidates:
        raise ValueError(
            f"could not locate the decoder layers of {type(model).__name__}: no nn.ModuleList of "
            f"{expected if expected is not None else 'decoder'} layers; pass "
            "blocks=[names of the layers in order, from model.named_modules()] to prunekit.prune"
        )
    name, layers = max(candidates, key=lambda c: sum(p.numel() for p in c[1].parameters()))
    return [f"{name}.{i}" for i in range(len(layers))]


def as_plain_float(model: nn.Module) -> nn.Module:
    """Drop transformers' "quantized with gguf" marker from a model loaded from a GGUF file.

    transformers dequantises GGUF weights to ordinary float tensors on load but keeps the
    model marked as quantized, and then refuses ``save_pretrained``. The weights are plain
    floats, so the marker is removed and the pruned model saves as an ordinary checkpoint."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and str(getattr(method, "value", method)) == "gguf":
        model.hf_quantizer = None
        model.is_quantized = False
        for obj in (model, model.config):
            if hasattr(obj, "quantization_method"):
                delattr(obj, "quantization_method")
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
    return model


@torch.no_grad()
def generate_sample(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 40) -> str:
    """Greedy continuation of ``prompt`` (deterministic, to compare methods side by side)."""
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
