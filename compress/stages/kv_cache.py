"""Stage `kv_cache`: simulated KV-cache quantization with the recipe's top-level `kv_cache`
settings. It attaches them to every attention module and switches the model to the "lmpress"
attention function (`lmpress.quant.attention`), which fake-quantizes K and V per head, per
token, in groups along head_dim (after the online Q/K rotation when `rotate` asked for one).
Place it before the weight quantization stages so calibration sees the quantized cache. No
options; the settings come from the recipe:

```yaml
kv_cache: {bits: 4, group_size: 64, key_granularity: token}
stages: [fuse_norms, rotate, kv_cache, rtn]
```
"""
from __future__ import annotations

from dataclasses import dataclass

from lmpress.quant.attention import attach_attention

from ..stage import register_stage


@register_stage("kv_cache")
@dataclass(frozen=True)
class KVCache:
    def apply(self, model, ctx) -> None:
        if ctx.kv_cache is None:
            raise ValueError(
                "stage kv_cache needs the recipe's top-level `kv_cache:` settings, e.g. "
                "`kv_cache: {bits: 4, group_size: 64, key_granularity: token}`"
            )
        attach_attention(model, ctx.arch, kv=ctx.kv_cache)
        if ctx.report is not None:
            ctx.report.extra["kv_cache"] = ctx.kv_cache.to_dict()
