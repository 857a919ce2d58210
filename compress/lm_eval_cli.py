"""lm-eval's own command line, with lmpress artifacts loadable by its stock ``hf`` model.

    python -m lmpress.compress.lm_eval_cli --model hf --model_args pretrained=DIR --tasks lmpress_wiki_mc --device cpu

lm-eval's ``hf`` model calls ``AutoModelForCausalLM.from_pretrained(DIR)``. Artifacts in
compressed-tensors form need nothing from lmpress; ``quant_method: lmpress`` artifacts need the
quantizer that importing `lmpress.compress` registers with transformers, which is all this
module adds (plus lmpress's bundled offline tasks on the include path unless one is given).
From Python the same is ``import lmpress.compress`` before ``lm_eval.simple_evaluate(model="hf",
model_args="pretrained=DIR", ...)``.
"""
from __future__ import annotations

import sys

import lmpress.compress  # noqa: F401  (registers quant_method: lmpress with transformers)


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    from lmpress.eval.tasks import TASKS_DIR

    if not any(a == "--include_path" or a.startswith("--include_path=") for a in sys.argv[1:]):
        sys.argv[1:1] = ["--include_path", str(TASKS_DIR)]
    cli_evaluate()


if __name__ == "__main__":
    main()
