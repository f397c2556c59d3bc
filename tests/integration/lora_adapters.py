"""Test adapters made with peft on the default model, and HF's greedy output with each.

Three adapters (`init_lora_weights=False`, so B is not zero), ranks 8 and 16, different
target modules, one with rsLoRA. Their B matrices are scaled down so the adapted model still
writes text (random full-size deltas would flatten the logits into near ties).
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import GREEDY_PROMPTS

ADAPTERS = {
    "sql": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "chat": dict(
        r=16,
        lora_alpha=32,
        use_rslora=True,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    ),  # fmt: skip
    "mlp": dict(r=16, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]),
}
B_SCALES = {"sql": 1.5, "chat": 0.3, "mlp": 1.5}  # each changes the output, still text
PROMPTS = GREEDY_PROMPTS[:8]
NEW_TOKENS = 12


def make_adapters(hf_model, folder: Path) -> dict[str, str]:
    """Write each adapter as a PEFT folder; returns name -> path. Leaves `hf_model` as it was."""
    from peft import LoraConfig, get_peft_model

    paths = {}
    for i, (name, spec) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + i)
        config = LoraConfig(init_lora_weights=False, lora_dropout=0.0, **spec)
        model = get_peft_model(hf_model, config)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.mul_(B_SCALES[name])
        path = folder / name
        model.save_pretrained(str(path))
        model.unload()  # NOTE: removes the LoRA layers; the base weights are untouched
        paths[name] = str(path)
    return paths


def hf_greedy_with(hf_model, hf_tokenizer, path: str | None, prompts=PROMPTS) -> list[list[int]]:
    """HF transformers' greedy tokens per prompt, with the adapter at `path` applied."""
    from peft import PeftModel

    model = hf_model if path is None else PeftModel.from_pretrained(hf_model, path)
    out = []
    try:
        for prompt in prompts:
            ids = hf_tokenizer(prompt, return_tensors="pt")["input_ids"]
            with torch.inference_mode():
                gen = model.generate(
                    input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False, top_p=None,
                    top_k=None,
                )  # fmt: skip
            out.append(gen[0, ids.shape[1] :].tolist())
    finally:
        if path is not None:
            model.unload()
    return out
