"""Tiny encoder-decoder models from transformers configs (T5, Whisper, Bart): random weights,
no download, two blocks in each stack, eval mode; and calibration batches for them (seeded)."""
import torch


def tiny_t5():
    """T5: vocab 64, d_model 32, 4 heads of 8, relative position bias (block 0 computes it)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return transformers.T5ForConditionalGeneration(cfg).eval()


def tiny_whisper():
    """Whisper: 8 mel bins, 16 input frames (8 after the strided convolution), d_model 32."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.WhisperConfig(vocab_size=64, num_mel_bins=8, encoder_layers=2, decoder_layers=2, d_model=32,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_source_positions=8, max_target_positions=16,
                                     decoder_start_token_id=1, pad_token_id=0, eos_token_id=2, bos_token_id=1)
    return transformers.WhisperForConditionalGeneration(cfg).eval()


def tiny_bart():
    """Bart: vocab 64, d_model 32, 32 positions."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=32)
    return transformers.BartForConditionalGeneration(cfg).eval()


def encdec_batches(model, n: int = 2, seed: int = 1, batch: int = 4) -> list[dict]:
    """``n`` mapping batches the model takes: the encoder's input (token ids, or Whisper's
    log-mel features) and 5 decoder token ids."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if type(model).__name__.startswith("Whisper"):
            encoder = {"input_features": torch.randn(batch, 8, 16, generator=g)}
        else:
            encoder = {"input_ids": torch.randint(3, 64, (batch, 7), generator=g)}
        out.append({**encoder, "decoder_input_ids": torch.randint(3, 64, (batch, 5), generator=g)})
    return out
