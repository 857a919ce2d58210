"""lmpress public API: recipes, `compress()`, packed checkpoints, the report.

    from lmpress.compress import Recipe, compress, save, load
    from lmpress.compress.models import load_model
    from lmpress.calibration.data import sample_calibration

    model, tok = load_model("smollm2-135m")
    report = compress(model, "w4a16-rtn", calib=sample_calibration(tok, "wiki", n=128, seqlen=512))
    save(model, "out/w4a16", tokenizer=tok)
    runtime = load("out/w4a16")
"""
from .arch import ArchMap, arch_for
from .checkpoint import CheckpointError, inspect, load, save
from .pipeline import build_plan, compress
from .recipe import Recipe, RecipeError, builtin_recipes
from .report import Report
from .stage import STAGES, Context, Stage, register_stage
from .workflow import compress_and_eval

from . import hf_quantizer as _hf_quantizer

_hf_quantizer.register()  # AutoModelForCausalLM.from_pretrained reads quant_method: lmpress artifacts

__all__ = [
    "ArchMap", "arch_for", "CheckpointError", "inspect", "load", "save", "build_plan", "compress",
    "Recipe", "RecipeError", "builtin_recipes", "Report", "STAGES", "Context", "Stage", "register_stage",
    "compress_and_eval",
]
