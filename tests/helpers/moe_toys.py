"""Tiny mixture-of-experts causal LMs from transformers configs: random weights, no download."""
import torch


def tiny_moe(kind: str = "mixtral", num_layers: int = 2, experts: int = 8, top_k: int = 2, **extra):
    """vocab 100, hidden 32, 4 heads (2 KV heads), ``experts`` experts of width 32 (Qwen2-MoE: a
    shared expert of width 48); eval mode, float32, seeded. ``extra`` config fields override these."""
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=100, hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=top_k,
                  tie_word_embeddings=False)

    def args(**defaults):
        return {**defaults, **common, **extra}
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(**args(intermediate_size=32, num_local_experts=experts))
        model = transformers.MixtralForCausalLM(cfg)
    elif kind == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(**args(intermediate_size=64, moe_intermediate_size=32,
                                                shared_expert_intermediate_size=48, num_experts=experts))
        model = transformers.Qwen2MoeForCausalLM(cfg)
    elif kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**args(intermediate_size=64, moe_intermediate_size=32, num_experts=experts,
                                               head_dim=8))
        model = transformers.Qwen3MoeForCausalLM(cfg)
    elif kind == "olmoe":
        cfg = transformers.OlmoeConfig(**args(intermediate_size=32, num_experts=experts))
        model = transformers.OlmoeForCausalLM(cfg)
    else:
        raise ValueError(f"kind must be mixtral, qwen2_moe, qwen3_moe or olmoe, got {kind!r}")
    return model.eval()


def token_batches(n: int = 4, batch: int = 2, seq: int = 16, seed: int = 1) -> list[torch.Tensor]:
    """``n`` batches of random token ids (vocab 100)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 100, (batch, seq), generator=g) for _ in range(n)]


@torch.no_grad()
def never_routed(model, expert: int, dim: int = 0, push: float = 100.0) -> None:
    """Make ``expert`` of every MoE layer lose every routing decision, for any input.

    Hidden dimension ``dim`` of the residual stream is made a constant 1 (the embeddings' column
    set to 1, and every module writing into the stream, attention ``o_proj``, the experts'
    ``down_proj`` and a shared expert's ``down_proj``, given a zero row there), so after the
    RMSNorm it is positive on every token; the other router rows ignore it, and the router row of ``expert`` is then ``-push`` times
    that direction, a logit so low its softmax probability is 0 in float32."""
    model.get_input_embeddings().weight[:, dim] = 1.0
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight[dim] = 0.0
        mlp = layer.mlp
        mlp.experts.down_proj[:, dim, :] = 0.0
        if hasattr(mlp, "shared_expert"):
            mlp.shared_expert.down_proj.weight[dim] = 0.0
        mlp.gate.weight[:, dim] = 0.0  # the other experts' logits ignore the constant
        mlp.gate.weight[expert] = 0.0
        mlp.gate.weight[expert, dim] = -push
