"""The text encoders of the SD single-file checkpoints: OpenCLIP's names (SDXL's second encoder under
`conditioner.embedders.1.model.`: `transformer.resblocks.N.attn.in_proj_weight` with q, k and v fused, `ln_1`,
`mlp.c_fc`, a `text_projection` matrix applied as x @ P) against transformers' CLIPTextModelWithProjection
(`text_model.encoder.layers.N.self_attn.q_proj`, a `text_projection` Linear, its weight P transposed), paired as
diffusers' single_file_utils.py `convert_open_clip_checkpoint` pairs them (0.42.1). CLIP-L (SD1's text encoder,
SDXL's first) is transformers' own CLIPTextModel under a prefix."""

from __future__ import annotations

import re

TOP = {"positional_embedding": "text_model.embeddings.position_embedding.weight",
       "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
       "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias",
       "text_projection": "text_projection.weight"}
LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
         "attn.out_proj": "self_attn.out_proj"}
FUSED = {"attn.in_proj_weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
         "attn.in_proj_bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")}
TRANSPOSED = {"text_projection"}
FUSED_NAMES = ("in_proj_weight", "in_proj_bias")
OPEN_LAYER = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
HF_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)")
NOT_WEIGHTS = {"logit_scale"}  # OpenCLIP's contrastive temperature: no part of the text encoder diffusers builds


def open_clip_to_transformers(name: str) -> tuple[str, ...] | None:
    """The transformers key(s) an OpenCLIP text-tower key is (q, k, v for the fused in-projection); None where it
    is none of them."""
    if name in TOP:
        return (TOP[name],)
    m = OPEN_LAYER.fullmatch(name)
    if not m:
        return None
    index, rest = m.groups()
    if rest in FUSED:
        return tuple(f"text_model.encoder.layers.{index}.{part}" for part in FUSED[rest])
    module, _, param = rest.rpartition(".")
    return (f"text_model.encoder.layers.{index}.{LAYER[module]}.{param}",) if module in LAYER else None


def transformers_to_open_clip(name: str) -> tuple[str, int] | None:
    """The OpenCLIP key a transformers key belongs to, and its place among the fused in-projection's parts."""
    for open_name, hf in TOP.items():
        if name == hf:
            return open_name, 0
    m = HF_LAYER.fullmatch(name)
    if not m:
        return None
    index, rest = m.groups()
    for open_name, parts in FUSED.items():
        if rest in parts:
            return f"transformer.resblocks.{index}.{open_name}", parts.index(rest)
    module, _, param = rest.rpartition(".")
    back = {v: k for k, v in LAYER.items()}
    return (f"transformer.resblocks.{index}.{back[module]}.{param}", 0) if module in back else None
