"""What a weights file is, from its keys and shapes alone (`inspect`'s `identity`): so far, whether it is a LoRA, in
which key convention, and its rank and alpha. The model family is not told yet (None: never guessed).

The conventions, as the tools that write and load them spell their keys:
- kohya (sd-scripts networks/lora.py LoRANetwork: `lora_unet_` / `lora_te_` / `lora_te1_` / `lora_te2_` module names,
  `.lora_down.weight`, `.lora_up.weight`, `.alpha`; diffusers lora_pipeline.py tells it by ".lora_down.weight");
- peft (save_pretrained of a PeftModel: `base_model.model.` before the module path, `.lora_A.weight` and
  `.lora_B.weight`; its alpha lives in adapter_config.json; diffusers tells it by "base_model.model.");
- diffusers (save_lora_weights: the pipeline component first, `unet.`, `transformer.`, `text_encoder.`,
  `text_encoder_2.`, then peft's `.lora_A.weight` / `.lora_B.weight`, or the older attention processors'
  `.lora.down.weight` / `.lora.up.weight`);
- original (the model's own single-file keys under `diffusion_model.`, as ai-toolkit and ComfyUI save them; diffusers
  tells them by "diffusion_model.").
"""

from __future__ import annotations

import re
import struct

from ckpttool.model import Checkpoint, TensorInfo

DOWN = re.compile(r"(.+)\.(?:lora_down|lora_A|lora\.down|lora_A\.default)\.weight")  # the LoRA's first matrix
UP = re.compile(r"(.+)\.(?:lora_up|lora_B|lora\.up|lora_B\.default)\.weight")
KOHYA_MODULE = re.compile(r"lora_(?:unet|te\d?|transformer|te_text_model)_")
DIFFUSERS_COMPONENTS = ("unet.", "transformer.", "text_encoder.", "text_encoder_2.", "prior.", "decoder.")
ALPHAS_READ = 4096  # `.alpha` scalars read at most (one per module; each a few bytes)


def identify(ckpt: Checkpoint) -> dict | None:
    """{"kind", "family", "convention", "rank", "alpha"} where the keys say what the file is; None where they do not
    (a full model, an optimizer: not told yet)."""
    tensors = [t for c in ckpt.components if c.role in ("model", "extra") for t in c.tensors]
    downs = {m.group(1): t for t in tensors if (m := DOWN.fullmatch(t.name))}
    ups = {m.group(1) for t in tensors if (m := UP.fullmatch(t.name))}
    if not downs or not ups or len(set(downs) & ups) < max(1, len(downs) // 2):
        return None
    ranks = sorted({int(t.shape[0]) for t in downs.values() if t.shape})
    return {"kind": "lora", "family": None, "convention": _convention(list(downs)),
            "rank": ranks[0] if len(ranks) == 1 else ranks, "alpha": _alpha(tensors, ckpt),
            "modules": len(downs)}


def _convention(modules: list[str]) -> str | None:
    """The key convention every module name follows; None where they follow none of them, or several."""
    def one(name: str) -> str | None:
        if KOHYA_MODULE.match(name):
            return "kohya"
        if name.startswith("base_model.model."):
            return "peft"
        if name.startswith("diffusion_model."):
            return "original"
        if name.startswith(DIFFUSERS_COMPONENTS):
            return "diffusers"
        return None

    found = {one(m) for m in modules}
    return found.pop() if len(found) == 1 else None


def _bf16(info: TensorInfo) -> float | None:
    """A bfloat16 scalar: the high half of a float32."""
    with open(info.location.file, "rb") as f:
        f.seek(info.location.offset + info.location.storage_offset * 2)
        data = f.read(2)
    return struct.unpack("<f", b"\x00\x00" + data)[0] if len(data) == 2 else None


def _alpha(tensors: list[TensorInfo], ckpt: Checkpoint) -> float | list | None:
    """The `.alpha` scalars kohya saves beside each module (one value, or the distinct ones), or the
    `lora_adapter_metadata` diffusers writes into a safetensors header (each component's `lora_alpha`); None where
    the file holds neither (peft keeps it in adapter_config.json)."""
    from ckpttool.formats.torchtree import read_scalar

    values = set()
    for t in [t for t in tensors if t.name.endswith(".alpha") and t.numel == 1 and t.location][:ALPHAS_READ]:
        try:
            value = _bf16(t) if t.dtype == "bfloat16" else read_scalar(t)
        except (OSError, ValueError, struct.error):  # a damaged scalar is verify's to report; here it is not shown
            continue
        if isinstance(value, (int, float)):
            values.add(float(value))
    if values:
        return values.pop() if len(values) == 1 else sorted(values)
    adapter = ckpt.metadata.get("lora_adapter_metadata")  # a safetensors header's __metadata__
    if isinstance(adapter, str):
        import json

        try:
            adapter = json.loads(adapter)
        except ValueError:
            adapter = None
    # diffusers writes one entry per component, `unet.lora_alpha`, `text_encoder.lora_alpha` (lora_base.py
    # _pack_dict_with_prefix); a plain adapter config has `lora_alpha`
    found = sorted({float(v) for k, v in (adapter.items() if isinstance(adapter, dict) else ())
                    if str(k).rpartition(".")[2] == "lora_alpha" and type(v) in (int, float)})
    return found[0] if len(found) == 1 else found or None
