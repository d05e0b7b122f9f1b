"""Make a LoRA adapter for the tiny model (``harness/tiny_model.py``), in PEFT's format.

Run with the vLLM virtualenv's Python (it needs torch and safetensors):
``python harness/tiny_lora.py OUTPUT_DIR``. Its weights are random and small: what the tests need
is an adapter vLLM accepts (``--lora-modules``), lists with ``parent`` and answers under its name.
A file of its own, not part of the tiny model's recipe, so that making it never invalidates the
cached model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HIDDEN, LAYERS, RANK = 1024, 4, 8
"""The tiny model's width and depth (``harness/tiny_model.py``), and the adapter's rank."""
TARGETS = ("q_proj", "v_proj")


def build(output: Path) -> None:
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(1)
    weights = {}
    for layer in range(LAYERS):
        for target in TARGETS:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            weights[f"{prefix}.lora_A.weight"] = torch.randn(RANK, HIDDEN) * 0.01
            weights[f"{prefix}.lora_B.weight"] = torch.randn(HIDDEN, RANK) * 0.01
    output.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(output / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": 2 * RANK,
        "lora_dropout": 0.0,
        "target_modules": list(TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "base_model_name_or_path": None,
    }
    (output / "adapter_config.json").write_text(json.dumps(config))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python harness/tiny_lora.py OUTPUT_DIR")
    build(Path(sys.argv[1]))
