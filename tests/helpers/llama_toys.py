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
