"""Where models come from: a Hugging Face directory, a .gguf file, or a built-in name
(`smollm2-135m`, the default; `tiny-llama`, a seeded random LLaMA for tests and demos)."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + <s>, </s>) built offline, for the tiny model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"<0x{i:02X}>": i for i in range(256)}
    vocab.update({"<s>": 256, "</s>": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # one piece per character
    tok.decoder = decoders.ByteFallback()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_llama_config(**overrides) -> LlamaConfig:
    """A small LLaMA: hidden 96 (not a power of two), GQA 6 query / 2 KV heads, tied embeddings."""
    cfg = dict(
        vocab_size=258, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=256, eos_token_id=257,
        architectures=["LlamaForCausalLM"],
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A seeded random tiny LLaMA and its byte tokenizer. Norm weights are randomized too, so
    norm-fusion bugs cannot hide behind all-ones gains."""
    torch.manual_seed(seed)
    config = tiny_llama_config(**overrides)
    model = LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)
    return model, byte_tokenizer()
