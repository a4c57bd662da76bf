"""Evaluation helpers: perplexity of a causal language model over a token stream."""
from __future__ import annotations

import math

import torch
from torch import nn

from .calls import eval_mode


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, *, seq_len: int = 256, batch_size: int = 8,
               max_sequences: int | None = None) -> float:
    """exp(mean next-token negative log-likelihood) over ``tokens`` cut into non-overlapping
    ``seq_len`` sequences (the remainder is dropped). ``model(input_ids=...)`` must return
    ``.logits`` (Hugging Face causal LMs) or the logits tensor itself. A model dispatched with
    accelerate (weights on the meta device) is fed where its hooks execute it."""
    from .llm import check_seq_len
    from .calls import home_device

    tokens = torch.as_tensor(tokens).reshape(-1)
    check_seq_len(model, seq_len)
    n = tokens.numel() // seq_len
    if max_sequences is not None:
        n = min(n, max_sequences)
    if n == 0:
        raise ValueError(f"the text has {tokens.numel()} tokens, fewer than one sequence of seq_len={seq_len}; "
                         "pass more text or a shorter seq_len")
    seqs = tokens[: n * seq_len].view(n, seq_len)
    total, count = 0.0, 0
    device = home_device(model)
    with eval_mode(model):
        for batch in seqs.split(batch_size):
            batch = batch.to(device)
            out = model(input_ids=batch)
            logits = out.logits if hasattr(out, "logits") else out
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                               batch[:, 1:].reshape(-1), reduction="sum")
            total += float(loss)
            count += batch[:, 1:].numel()
    return math.exp(total / count)
