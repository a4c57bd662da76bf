"""Load what a user points at (a model, its weights, calibration data), failing early and clearly.

This is the layer under ``prunekit prune`` and :func:`prunekit.run_recipe`: every error names
the parameter at fault and how to fix it, before any pruning starts.

Model sources: a Hugging Face model folder (or a model name in the offline cache),
``"package.module:factory"`` (called with ``kwargs``), or ``"builtin:minilm"`` /
``"builtin:smollm2"`` (the offline models of :mod:`prunekit.zoo`).
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import sys
import warnings
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from ..calls import as_call, eval_mode, forward_until, model_device, to_device
from ..sparsity.storage import storage_key

BUILTIN_MODELS = ("minilm", "smollm2")
BUILTIN_TENSORS = ("builtin:mnist",)
CORPORA = ("pydoc",)
_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "vocab.json")


def is_factory(source: str) -> bool:
    """Whether ``source`` reads ``package.module:factory`` (and is not an existing path)."""
    return bool(_FACTORY.fullmatch(source)) and not source.startswith("builtin:") and not os.path.exists(source)


# -- models ----------------------------------------------------------------------------------
def load_model(source: str, *, state_dict: str | None = None, kwargs: Mapping[str, Any] | None = None,
               gguf_file: str | None = None, root: str | None = None) -> tuple[nn.Module, Any]:
    """``(model in eval mode, tokenizer or None)`` from a Hugging Face folder / offline model
    name, a ``builtin:`` name, or ``package.module:factory`` (called with ``kwargs``).

    ``state_dict`` (.pt/.pth/.bin or .safetensors, including prunekit compressed files) is then
    loaded strictly. ``root`` is an extra folder to import factory modules from (a recipe's)."""
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"model source must be a non-empty string, got {source!r}; pass a Hugging Face "
                         "model directory or package.module:factory")
    kwargs = dict(kwargs or {})
    if source.startswith("builtin:"):
        source, gguf_file = _builtin(source, gguf_file)
    if is_factory(source):
        model, tokenizer = _from_factory(source, kwargs, root), None
    else:
        model, tokenizer = _from_hf(source, kwargs, gguf_file)
    if state_dict is not None:
        load_state_dict_file(model, state_dict)
    return model.eval(), tokenizer


def _builtin(source: str, gguf_file: str | None) -> tuple[str, str | None]:
    name = source.split(":", 1)[1]
    if name == "minilm":
        from ..zoo.minilm import minilm_path

        return minilm_path(), gguf_file
    if name == "smollm2":
        from ..zoo.smollm2 import GGUF_FILE, smollm2_path

        return smollm2_path(), gguf_file or GGUF_FILE
    raise ValueError(f"unknown builtin model {source!r}; known: {', '.join('builtin:' + n for n in BUILTIN_MODELS)}")


@contextlib.contextmanager
def _import_path(root: str | None) -> Iterator[None]:
    """Temporarily let imports see ``root`` and the working folder (the console script does not)."""
    extra = [p for p in (root, os.getcwd()) if p and p not in sys.path]
    sys.path[:0] = extra
    try:
        yield
    finally:
        for p in extra:
            with contextlib.suppress(ValueError):
                sys.path.remove(p)


def _from_factory(source: str, kwargs: dict, root: str | None) -> nn.Module:
    module_name, attr = source.split(":", 1)
    with _import_path(root):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise ValueError(f"model source {source!r}: cannot import module {module_name!r} ({exc}); check the "
                             "spelling, and that its folder is the recipe's, the working folder or on PYTHONPATH") from exc
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            public = [n for n in dir(module) if not n.startswith("_")]
            raise ValueError(f"model source {source!r}: module {module_name!r} has no attribute {attr!r}; "
                             f"it has {public[:20]}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise TypeError(f"model source {source!r}: {attr} is a {type(factory).__name__}, not a callable that "
                        "returns an nn.Module")
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise TypeError(f"model source {source!r}: calling {attr}(**{kwargs}) failed: {exc}; check model.kwargs") from exc
    if not isinstance(model, nn.Module):
        raise TypeError(f"model source {source!r}: {attr}() returned a {type(model).__name__}, not an nn.Module")
    return model


def _from_hf(source: str, kwargs: dict, gguf_file: str | None) -> tuple[nn.Module, Any]:
    is_dir = os.path.isdir(source)
    looks_like_path = os.path.isabs(source) or source.startswith((".", "~")) or source.count("/") > 1
    if os.path.isfile(source):
        raise FileNotFoundError(f"model path {source!r} is a file, not a folder; pass a Hugging Face model "
                                "directory or package.module:factory (weights go in state_dict)")
    if not is_dir and looks_like_path:
        raise FileNotFoundError(f"model path {source!r} does not exist; pass a Hugging Face model directory "
                                "or package.module:factory")
    if is_dir and gguf_file is None and not os.path.exists(os.path.join(source, "config.json")):
        raise FileNotFoundError(f"model path {source!r} has no config.json, so it is not a Hugging Face model "
                                "directory; pass a folder written by save_pretrained, set gguf_file, or use "
                                "package.module:factory")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("loading a Hugging Face model needs transformers: pip install 'prunekit[hf]'") from exc
    # local_files_only: never the network, even if huggingface_hub was imported before the variable was set
    extra = {"gguf_file": gguf_file, "local_files_only": True} if gguf_file else {"local_files_only": True}
    try:
        config = transformers.AutoConfig.from_pretrained(source, **extra)
    except (OSError, ValueError) as exc:  # not found offline, or not a valid model id
        if is_dir:
            raise
        raise FileNotFoundError(f"model path {source!r} does not exist and is not a model in the offline Hugging "
                                "Face cache; pass a Hugging Face model directory or package.module:factory") from exc
    causal = any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    model = auto.from_pretrained(source, **{**extra, **kwargs})
    if gguf_file:  # dequantised on load; without this, save_pretrained refuses the model
        from ..llm import as_plain_float

        as_plain_float(model)
    return model, _tokenizer(transformers, source, is_dir, extra)


def _tokenizer(transformers: Any, source: str, is_dir: bool, extra: dict) -> Any:
    if is_dir and "gguf_file" not in extra and not any(os.path.exists(os.path.join(source, f)) for f in _TOKENIZER_FILES):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(source, **extra)
    except Exception as exc:  # a model may ship without a usable tokenizer; text data will say so
        warnings.warn(f"could not load a tokenizer from {source!r}: {exc}", stacklevel=3)
        return None


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face causal language model (``...ForCausalLM``)."""
    return type(model).__name__.endswith("ForCausalLM")


# -- weights ---------------------------------------------------------------------------------
def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a .pt/.pth/.bin (``weights_only``) or .safetensors file (prunekit compressed too)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"state_dict file {path!r} does not exist; pass the path of a .pt, .pth or "
                                ".safetensors file")
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") == "prunekit-sparse":
            from ..formats.compact import load

            return dict(load(path))
        return load_file(path)
    if not path.endswith((".pt", ".pth", ".bin")):
        raise ValueError(f"state_dict file {path!r} must end in .pt, .pth, .bin or .safetensors")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"state_dict file {path!r} cannot be read with torch.load(weights_only=True): {exc}; "
                         "save it with torch.save(model.state_dict(), path)") from exc
    if isinstance(state, Mapping) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        for key in ("state_dict", "model"):  # a training checkpoint: {"model": ..., "optimizer": ...}
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TypeError(f"state_dict file {path!r} holds a {type(state).__name__}, not a mapping of names to "
                        "tensors; save it with torch.save(model.state_dict(), path)")
    return dict(state)


def load_state_dict_file(model: nn.Module, path: str) -> None:
    """Load ``path`` into ``model`` strictly: every key present, none extra, shapes equal.
    Keys of tied (shared) tensors may be stored once."""
    state = read_state_dict(path)
    own = model.state_dict()
    stored = {storage_key(own[k]) for k in own if k in state} - {None}
    missing = [k for k in own if k not in state and storage_key(own[k]) not in stored]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{label} {items[:5]}" + (f" and {len(items) - 5} more" if len(items) > 5 else "")
                 for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                      ("shape mismatches", shapes)) if items]
        hint = ("; the file's keys carry a 'module.' prefix (DataParallel): strip it"
                if unexpected and all(k.startswith("module.") for k in unexpected) else "")
        raise ValueError(f"state_dict file {path!r} does not fit the model ({'; '.join(parts)}){hint}; "
                         "check model.source and model.kwargs build the architecture the weights came from")
    model.load_state_dict({k: v for k, v in state.items()}, strict=False)


# -- calibration -----------------------------------------------------------------------------
def build_calibration(data: Mapping[str, Any], model: nn.Module, tokenizer: Any = None) -> list:
    """Calibration batches from a recipe's ``data`` section: ``text: [files]`` or
    ``corpus: pydoc`` (tokenized; options ``seq_len`` 128, ``n_sequences`` 64, ``batch_size`` 8),
    or ``tensors: file.pt|file.npy|builtin:mnist`` (one array ``[N, ...]``; ``batch_size`` 32,
    ``n_samples`` all / 256 for mnist)."""
    data = {k: v for k, v in dict(data).items() if v is not None}
    sources = [k for k in ("text", "corpus", "tensors") if k in data]
    if len(sources) != 1:
        raise ValueError(f"data needs exactly one of text, corpus or tensors, got {sources or 'none'}; "
                         "e.g. data: {corpus: pydoc}")
    if sources[0] == "tensors":
        return _tensor_batches(data, model)
    return _text_batches(data, model, tokenizer)


def _read_text(data: Mapping[str, Any]) -> str:
    if "corpus" in data:
        if data["corpus"] not in CORPORA:
            raise ValueError(f"data.corpus must be one of {CORPORA}, got {data['corpus']!r}")
        from ..zoo.text import pydoc_text, split_text

        return split_text(pydoc_text())[0]
    files = [data["text"]] if isinstance(data["text"], str) else list(data["text"])
    if not files:
        raise ValueError("data.text is an empty list; pass one or more text files")
    parts = []
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"data.text file {f!r} does not exist; pass paths of UTF-8 text files")
        with open(f, encoding="utf-8") as fh:
            parts.append(fh.read())
    return "\n\n".join(parts)


def _text_batches(data: Mapping[str, Any], model: nn.Module, tokenizer: Any) -> list:
    from ..llm import check_seq_len, text_calibration, tokenize

    if tokenizer is None:
        raise ValueError("text calibration data needs a tokenizer, and this model has none; use a Hugging Face "
                         "model folder with tokenizer files, or data: {tensors: inputs.pt}")
    seq_len, n_seq, bs = data.get("seq_len", 128), data.get("n_sequences", 64), data.get("batch_size", 8)
    check_seq_len(model, seq_len)
    text = _read_text(data)
    # Tokenize only what is needed (with a wide margin): the pydoc corpus is ~1 MB.
    need = seq_len * n_seq if isinstance(n_seq, int) else 0
    head = text[: 16 * need]
    with warnings.catch_warnings():  # "sequence longer than the model's maximum": we cut it up
        warnings.simplefilter("ignore")
        ids = tokenize(tokenizer, head)
        if ids.numel() < need and len(head) < len(text):
            ids = tokenize(tokenizer, text)
    batches = text_calibration(tokenizer, ids, seq_len=seq_len, n_sequences=n_seq, batch_size=bs, model=model)
    if is_causal_lm(model):
        return batches
    # Encoders (BERT...) take no use_cache; give them an explicit all-ones attention mask.
    return [{"input_ids": b["input_ids"], "attention_mask": torch.ones_like(b["input_ids"])} for b in batches]


def _tensor_batches(data: Mapping[str, Any], model: nn.Module) -> list[torch.Tensor]:
    path, bs, n = data["tensors"], data.get("batch_size", 32), data.get("n_samples")
    for name, value in (("batch_size", bs), ("n_samples", n)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"data.{name} must be a positive integer, got {value!r}")
    if path == "builtin:mnist":
        from ..zoo.mnist import load_mnist

        x, _ = load_mnist("train")
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[: n or 256]]
    else:
        x = _read_array(path)
    if x.ndim == 0 or len(x) == 0:
        raise ValueError(f"data.tensors file {path!r} holds no samples; it must hold one array [N, ...]")
    if x.is_floating_point():  # e.g. float64 from numpy: match the model's weights
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), x.dtype)
        x = x.to(dtype)
    return list(x[:n].split(bs))


def _read_array(path: str) -> torch.Tensor:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.tensors file {path!r} does not exist; pass a .pt or .npy file holding one "
                                "array [N, ...]")
    if path.endswith(".npy"):
        return torch.from_numpy(np.load(path, allow_pickle=False))
    if not path.endswith((".pt", ".pth")):
        raise ValueError(f"data.tensors file {path!r} must end in .pt, .pth or .npy")
    x = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"data.tensors file {path!r} holds a {type(x).__name__}, not one tensor [N, ...]; "
                        "save it with torch.save(inputs, path)")
    return x


def check_calibration_fits(model: nn.Module, batches: list, last_block: nn.Module | None = None) -> None:
    """Run ``model`` on the first batch (no grad, eval mode), up to ``last_block`` when given;
    raise a ValueError saying so if it fails. The model is left as it was."""
    if not batches:
        raise ValueError("the calibration data is empty; pass at least one batch")
    args, kwargs = to_device(as_call(batches[0]), model_device(model))
    try:
        with eval_mode(model):
            forward_until(model, last_block, args, kwargs)
    except Exception as exc:
        shapes = json.dumps({k: list(v.shape) for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
                            or [list(a.shape) for a in args if isinstance(a, torch.Tensor)])
        raise ValueError(f"the calibration data does not fit the model: {exc}; the first batch has shapes {shapes}: "
                         "check data (tensors shape / dtype, or text for a model with a tokenizer)") from exc
