"""A tiny llama-style causal LM from a transformers config: random weights, no download."""
import torch


def tiny_llama(num_layers: int = 2):
    """vocab 100, hidden 64, 4 heads (2 KV heads), tied embeddings, 64 positions; eval mode."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def token_batches(n: int = 4, seed: int = 1, length: int = 24, batch: int = 2) -> list[torch.Tensor]:
    """``n`` batches of ``batch`` random sequences of ``length`` token ids below 100 (seeded)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 100, (batch, length), generator=g) for _ in range(n)]
