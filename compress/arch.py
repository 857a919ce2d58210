"""Architecture knowledge, declared once: where the layers, projections, norms, embeddings and
head of each supported Hugging Face architecture live, and the facts the transforms need (a norm
computing x̂·(1 + w), RMSNorm on q and k, norms between a sublayer and the residual). Code asks
the table; it never branches on `model_type`.

Where a fact breaks a stage's invariance the record refuses that stage, with the reason
(`ArchMap.refuses`, checked by `check_recipe` before anything changes):
- a post-norm (Gemma's sandwich: `post_norms`) normalizes o_proj's and down_proj's outputs before
  the residual add. R1 rotates the residual stream, and an RMSNorm with a gain does not commute
  with a rotation, so `rotate` / `learn_rotation` cannot fold R1;
- RMSNorm on each head of q and k (`qk_norm`: Qwen3, Gemma 3) renormalizes what q_proj / k_proj
  produce, so FireQ's pre-RoPE scales folded into them (`rope_scale`) would not reach RoPE.

A causal LM without a record still takes the weight-only stages through `discover(model)`: its
decoder layers are the longest `ModuleList` of one block class, its linears and their sequential
groups (linears reading the same tensor) are traced from one short forward; every stage that needs
to know where the norms, heads or projections are refuses with a message naming it."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

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
    norm_offset: float = 0.0  # the norms compute x̂ · (offset + w): Gemma's 1
    qk_norm: bool = False  # RMSNorm on each head of q and k, after the projections (Qwen3, Gemma 3)
    post_norms: tuple[str, ...] = ()  # norms on a sublayer's output before the residual add (Gemma's sandwich)
    refuses: dict[str, str] = field(default_factory=dict)  # stage name -> why this architecture cannot take it
    groups: tuple[tuple[str, ...], ...] = ()  # sequential groups when they are not q/k/v, o, gate/up, down (discovered)
    name: str = ""  # how messages name the architecture (default: its first class name)
    # fused linears stored as one (Phi-3's qkv_proj, gate_up_proj): path -> its parts (name, rows: "heads" | "kv_heads"
    # (times head_dim) | "half"), split by `kernels.fused.split_fused` when a stage needs the parts
    fused: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    attn: str = ""  # the attention module, where q_proj's parent is not it (a split qkv_proj)
    mlp_path: str = ""  # the MLP module, where gate_proj's parent is not it
    experts: str = ""  # a mixture-of-experts block's experts (split one linear pair each by `kernels.experts`)
    discovered: bool = False  # made by `discover`: no record, weight-only stages

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.architectures[0] if self.architectures else "this model")
        refuses = dict(self.refuses)
        if self.post_norms:
            why = (f"R1 rotates the residual stream, but {', '.join(self.post_norms)} normalize each sublayer's output "
                   "before the residual add, and an RMSNorm with a gain does not commute with a rotation")
            refuses.setdefault("rotate", why)
            refuses.setdefault("learn_rotation", why)
        if self.experts:
            why = ("the MLP is a mixture of experts: its input norm feeds the router and every expert, and lmpress folds "
                   "no transform into the router yet")
            for stage in ("fuse_norms", "rotate", "learn_rotation", "smoothquant", "awq", "flatquant", "structured",
                          "mixed_precision"):
                refuses.setdefault(stage, why)
        if self.qk_norm:
            refuses.setdefault("rope_scale", "q_norm / k_norm renormalize each head after q_proj and k_proj, so pre-RoPE "
                                             "scales folded into the projections would not reach RoPE")
        object.__setattr__(self, "refuses", refuses)
        if not self.norm_readers and not self.discovered:
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
        if self.groups:
            return self.groups
        return ((self.q_proj, self.k_proj, self.v_proj), (self.o_proj,), (self.gate_proj, self.up_proj), (self.down_proj,))

    @property
    def generic(self) -> bool:
        """True for a discovered architecture (no record: weight-only stages only)."""
        return self.discovered

    def check_recipe(self, recipe) -> None:
        """Refuse, before anything changes, a recipe with a stage this architecture cannot take."""
        for stage in recipe.stages:
            why = self.refuses.get(stage.name)
            if why is None and self.generic and stage.name not in GENERIC_STAGES:
                why = (f"it needs an architecture record (where the norms, projections and heads are); {self.name} has none. "
                       f"Without one, lmpress runs the weight-only stages {', '.join(GENERIC_STAGES)}")
            if why is not None:
                raise ValueError(f"stage {stage.name!r} cannot run on {self.name}: {why}; remove it from the recipe")
        if self.generic and recipe.kv_args is not None:
            raise ValueError(f"KV-cache quantization cannot run on {self.name}: it needs an architecture record (where the "
                             "attention is); remove kv_cache from the recipe")

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    @property
    def attention(self) -> str:
        """The attention module inside a decoder layer (q_proj's parent), e.g. "self_attn"; "" when
        not known (a discovered architecture)."""
        return "" if self.generic else self.attn or self.q_proj.rpartition(".")[0]

    @property
    def mlp(self) -> str:
        """The MLP module inside a decoder layer (gate_proj's parent), e.g. "mlp"."""
        return self.mlp_path or self.gate_proj.rpartition(".")[0]

    def fused_parts(self, config) -> dict[str, tuple[tuple[str, int], ...]]:
        """{fused linear's path: ((part, rows), ...)} for a model with this `config`."""
        hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        unit = {"heads": config.num_attention_heads * hd, "kv_heads": config.num_key_value_heads * hd,
                "half": config.intermediate_size}
        return {path: tuple((name, unit[u]) for name, u in parts) for path, parts in self.fused.items()}

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
QWEN3 = ArchMap(architectures=("Qwen3ForCausalLM",), model_types=("qwen3",), qk_norm=True)
# Phi-3: q/k/v fused in qkv_proj, gate/up in gate_up_proj; split into parts when a stage needs them (a weight-only
# recipe quantizes the fused linears as they are, through `discover`: the artifact stays stock-loadable)
PHI3 = ArchMap(architectures=("Phi3ForCausalLM",), model_types=("phi3",), q_proj="self_attn.qkv_proj.q",
               k_proj="self_attn.qkv_proj.k", v_proj="self_attn.qkv_proj.v", gate_proj="mlp.gate_up_proj.gate",
               up_proj="mlp.gate_up_proj.up", attn="self_attn", mlp_path="mlp",
               fused={"self_attn.qkv_proj": (("q", "heads"), ("k", "kv_heads"), ("v", "kv_heads")),
                      "mlp.gate_up_proj": (("gate", "half"), ("up", "half"))})
# Gemma 3 (text): norms x̂·(1 + w); the MLP reads pre_feedforward_layernorm; post_attention_layernorm and
# post_feedforward_layernorm sit between each sublayer and the residual; q_norm / k_norm; sliding-window and
# global layers with their own RoPE (the runner gives each layer its own mask and rotary embedding).
# Mixtral, Qwen3-MoE: LLaMA's attention (Qwen3-MoE with q/k norms); the experts split per expert before any stage;
# the transforms that touch the MLP's input are refused (see `ArchMap.refuses`)
MIXTRAL = ArchMap(architectures=("MixtralForCausalLM",), model_types=("mixtral",), experts="mlp.experts")
QWEN3_MOE = ArchMap(architectures=("Qwen3MoeForCausalLM",), model_types=("qwen3_moe",), experts="mlp.experts", qk_norm=True)
GEMMA3 = ArchMap(architectures=("Gemma3ForCausalLM",), model_types=("gemma3_text",), post_attn_norm="pre_feedforward_layernorm",
                 norm_offset=1.0, qk_norm=True, post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
                 refuses={"rotate_kv": "its sliding-window and global layers use different RoPE bases, and RotateKV's key "
                                       "rotation undoes one model-wide RoPE"})

ARCHS: tuple[ArchMap, ...] = (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA3, PHI3, MIXTRAL, QWEN3_MOE)
GENERIC_STAGES = ("rtn", "gptq", "act_scales", "magnitude", "wanda", "sparsegpt")  # what a discovered architecture can take


def supported_architectures() -> list[str]:
    return [a for arch in ARCHS for a in arch.architectures]


def wants_record(recipe) -> bool:
    """True when `recipe` has a stage beyond the weight-only ones a discovered architecture takes."""
    return recipe.kv_args is not None or any(s.name not in GENERIC_STAGES for s in recipe.stages)


def record_for(model_or_config) -> ArchMap | None:
    """The recorded ArchMap of a model or config, None when there is none."""
    config = getattr(model_or_config, "config", model_or_config)
    names = tuple(getattr(config, "architectures", None) or ())
    model_type = getattr(config, "model_type", None)
    for arch in ARCHS:
        if set(names) & set(arch.architectures) or (not names and model_type in arch.model_types):
            return arch
    return None


def arch_for(model_or_config) -> ArchMap:
    """The ArchMap of a model (or its config): its record, else (for a model) what `discover`
    finds; a clear error naming the supported architectures when neither works."""
    arch = record_for(model_or_config)
    config = getattr(model_or_config, "config", model_or_config)
    if arch is not None and arch.fused and isinstance(model_or_config, nn.Module):
        from lmpress.kernels.fused import is_split

        if not is_split(arch.decoder_layers(model_or_config), arch.fused):
            arch = None  # the fused linears as they are: the discovered, weight-only view
    if arch is not None and arch.experts and isinstance(model_or_config, nn.Module):
        from lmpress.kernels.experts import ExpertLinears

        experts = arch.decoder_layers(model_or_config)[0].get_submodule(arch.experts)
        e = experts.num_experts if isinstance(experts, ExpertLinears) else 0  # fused (3-D parameters): no expert linears yet
        # the attention's groups, then one group per expert linear (each reads its own tokens)
        arch = replace(arch, groups=(arch.sequential_groups[0], arch.sequential_groups[1],
                                     *[(f"{arch.experts}.gate_up.{i}",) for i in range(e)],
                                     *[(f"{arch.experts}.down.{i}",) for i in range(e)]))
    if arch is not None:
        return arch
    if isinstance(model_or_config, nn.Module):
        cached = getattr(model_or_config, "_lmpress_arch", None)
        if cached is None:
            cached = discover(model_or_config)
            object.__setattr__(model_or_config, "_lmpress_arch", cached)  # not a module attribute: no state_dict entry
        return cached
    got = ", ".join(getattr(config, "architectures", None) or ()) or f"model_type={getattr(config, 'model_type', None)!r}"
    raise ValueError(
        f"unsupported architecture {got}; lmpress has records for {', '.join(supported_architectures())} "
        f"(any other causal LM whose decoder layers it can find takes the weight-only stages {', '.join(GENERIC_STAGES)})"
    )


def discover(model: nn.Module) -> ArchMap:
    """An ArchMap for a causal LM without a record: the decoder layers are the longest
    `ModuleList` whose modules share one class and hold linears; the linears of layer 0 in the order one short
    forward calls them, grouped where they read the same tensor (q/k/v, gate/up), then each split
    expert's linears (`kernels.experts.ExpertLinears`) in a group of their own; embeddings and
    head from `get_input_embeddings` / `get_output_embeddings`. Weight-only stages only."""
    import torch

    names = {id(m): n for n, m in model.named_modules()}
    lists = [(n, m) for n, m in model.named_modules()  # blocks that hold linears (not a list of linears: split experts)
             if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(b) for b in m}) == 1
             and not isinstance(m[0], nn.Linear) and any(isinstance(c, nn.Linear) for c in m[0].modules())]
    cls = type(model).__name__
    if not lists:
        raise ValueError(f"unsupported architecture {cls}: no decoder layers found (a ModuleList of one block class); "
                         f"lmpress has records for {', '.join(supported_architectures())}")
    layers_path, layers = max(lists, key=lambda nm: len(nm[1]))
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embed is None or head is None or id(embed) not in names or id(head) not in names:
        raise ValueError(f"unsupported architecture {cls}: no input or output embeddings to find")
    from lmpress.kernels.experts import ExpertLinears

    experts = [(n, m) for n, m in layers[0].named_modules() if isinstance(m, ExpertLinears)]
    expert_ids = {id(lin) for _, m in experts for lin in m.modules()}
    linears = {id(m): n for n, m in layers[0].named_modules() if isinstance(m, nn.Linear) and id(m) not in expert_ids}
    if not linears and not experts:
        raise ValueError(f"unsupported architecture {cls}: decoder layer 0 ({layers_path}.0) has no nn.Linear to quantize")
    order: list[tuple[str, int]] = []  # (path in the layer, id of the tensor it read)
    hooks = [m.register_forward_pre_hook(lambda m, a, kw=None: order.append((linears[id(m)], id(a[0]))))
             for m in layers[0].modules() if id(m) in linears]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 4), dtype=torch.long, device=device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    last = None
    for rel, src in order:
        if rel in {r for g in groups for r in g}:
            continue  # called again (an expert, a loop): its first call places it
        if groups and src == last:
            groups[-1].append(rel)
        else:
            groups.append([rel])
        last = src
    for path, m in experts:  # one group per expert linear (each reads its own tokens), gate_up before down
        groups += [[f"{path}.gate_up.{e}"] for e in range(m.num_experts)] + [[f"{path}.down.{e}"] for e in range(m.num_experts)]
    missing = sorted(set(linears.values()) - {r for g in groups for r in g})
    if missing:
        raise ValueError(f"unsupported architecture {cls}: linears {missing} of decoder layer 0 were not called by a forward")
    return ArchMap(architectures=(cls,), model_types=(getattr(model.config, "model_type", ""),), layers=layers_path,
                   embed=names[id(embed)], final_norm="", lm_head=names[id(head)], rotary="",
                   groups=tuple(tuple(g) for g in groups), name=f"{cls} (discovered, no record)", discovered=True)
