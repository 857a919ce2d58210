"""Architecture knowledge, declared once: where the layers, projections, norms, embeddings and
head of each supported Hugging Face architecture live. Code asks the table; it never branches
on `model_type`."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class ArchMap:
    """Module paths of one decoder-only architecture (relative to the model or to a layer)."""

    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    rotary: str = "model.rotary_emb"
    # inside a decoder layer
    q_proj: str = "self_attn.q_proj"
    k_proj: str = "self_attn.k_proj"
    v_proj: str = "self_attn.v_proj"
    o_proj: str = "self_attn.o_proj"
    gate_proj: str = "mlp.gate_proj"
    up_proj: str = "mlp.up_proj"
    down_proj: str = "mlp.down_proj"
    input_norm: str = "input_layernorm"
    post_attn_norm: str = "post_attention_layernorm"
    # which linears of a layer read each norm's output (for norm fusion / rotations)
    norm_readers: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.norm_readers:
            object.__setattr__(
                self,
                "norm_readers",
                {self.input_norm: (self.q_proj, self.k_proj, self.v_proj), self.post_attn_norm: (self.gate_proj, self.up_proj)},
            )

    @property
    def linears(self) -> tuple[str, ...]:
        """Every linear of a decoder layer, in the order its input is produced."""
        return tuple(p for group in self.sequential_groups for p in group)

    @property
    def sequential_groups(self) -> tuple[tuple[str, ...], ...]:
        """Linears that share an input, in execution order (true-sequential quantization)."""
        return ((self.q_proj, self.k_proj, self.v_proj), (self.o_proj,), (self.gate_proj, self.up_proj), (self.down_proj,))

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    @property
    def attention(self) -> str:
        """The attention module inside a decoder layer (q_proj's parent), e.g. "self_attn"."""
        return self.q_proj.rpartition(".")[0]

    def head_dim(self, layer: nn.Module, config) -> int:
        """Head size of a decoder layer's attention (its `head_dim`, else hidden / heads)."""
        return getattr(layer.get_submodule(self.attention), "head_dim", None) or config.hidden_size // config.num_attention_heads

    def layer_of(self, fqn: str, n_layers: int | None = None) -> tuple[int | None, str]:
        """(decoder layer index, path inside that layer) of a module name, or (None, fqn) for a
        module outside the decoder layers (or past `n_layers`)."""
        prefix = self.layers + "."
        if not fqn.startswith(prefix):
            return None, fqn
        idx, _, rel = fqn[len(prefix):].partition(".")
        if not idx.isdigit() or (n_layers is not None and int(idx) >= n_layers):
            return None, fqn
        return int(idx), rel


LLAMA = ArchMap(architectures=("LlamaForCausalLM",), model_types=("llama",))
MISTRAL = ArchMap(architectures=("MistralForCausalLM",), model_types=("mistral",))
QWEN2 = ArchMap(architectures=("Qwen2ForCausalLM",), model_types=("qwen2",))

ARCHS: tuple[ArchMap, ...] = (LLAMA, MISTRAL, QWEN2)


def supported_architectures() -> list[str]:
    return [a for arch in ARCHS for a in arch.architectures]


def arch_for(model_or_config) -> ArchMap:
    """The ArchMap of a model (or its config); a clear error naming the supported ones."""
    config = getattr(model_or_config, "config", model_or_config)
    names = tuple(getattr(config, "architectures", None) or ())
    model_type = getattr(config, "model_type", None)
    for arch in ARCHS:
        if set(names) & set(arch.architectures) or (not names and model_type in arch.model_types):
            return arch
    got = ", ".join(names) or f"model_type={model_type!r}"
    raise ValueError(
        f"unsupported architecture {got}; lmpress supports {', '.join(supported_architectures())}"
    )
