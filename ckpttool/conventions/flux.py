"""Flux.1's transformer under BFL's own module names (flux/model.py: `double_blocks`, `single_blocks`, fused `qkv`
and `linear1`) and under diffusers' (FluxTransformer2DModel), as diffusers' own conversion pairs them
(loaders/lora_conversion_utils.py `_convert_kohya_flux_lora_to_diffusers`, single_file_utils.py
`convert_flux_transformer_checkpoint_to_diffusers`, 0.42.1)."""

from __future__ import annotations

import re

# one BFL module -> one diffusers module, per block index
DOUBLE = {"img_attn.proj": "attn.to_out.0", "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
          "img_mod.lin": "norm1.linear", "txt_attn.proj": "attn.to_add_out", "txt_mlp.0": "ff_context.net.0.proj",
          "txt_mlp.2": "ff_context.net.2", "txt_mod.lin": "norm1_context.linear"}
SINGLE = {"linear2": "proj_out", "modulation.lin": "norm.linear"}
TOP = {"img_in": "x_embedder", "txt_in": "context_embedder",
       "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
       "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
       "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
       "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
       "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
       "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
       "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear"}
# fused BFL modules: their output is the diffusers modules' outputs one after another
DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
# BFL's final modulation gives (shift, scale), diffusers' AdaLayerNormContinuous (scale, shift): the halves swap
SWAPPED = {"final_layer.adaLN_modulation.1"}
MLP_RATIO = 4  # Flux.1's single blocks: mlp_ratio 4.0 in both flux/model.py and FluxSingleTransformerBlock
BLOCK = re.compile(r"(double_blocks|single_blocks)\.(\d+)\.(.+)")
DIFFUSERS_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")
KIND = {"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}


def to_diffusers(name: str) -> tuple[str, ...] | None:
    """The diffusers module(s) a BFL module is (several for a fused one, in output order); None for a name that is
    not one of Flux.1's linear modules."""
    if name in TOP:
        return (TOP[name],)
    m = BLOCK.fullmatch(name)
    if not m:
        return None
    kind, index, rest = m.groups()
    plain, fused = (DOUBLE, DOUBLE_FUSED) if kind == "double_blocks" else (SINGLE, SINGLE_FUSED)
    prefix = f"{KIND[kind]}.{index}."
    if rest in plain:
        return (prefix + plain[rest],)
    if rest in fused:
        return tuple(prefix + part for part in fused[rest])
    return None


def to_original(name: str) -> tuple[str, int] | None:
    """The BFL module a diffusers module belongs to and its place among a fused module's parts (0 when not fused);
    None for a name that is not one of FluxTransformer2DModel's linear modules."""
    for bfl, diffusers in TOP.items():
        if name == diffusers:
            return bfl, 0
    m = DIFFUSERS_BLOCK.fullmatch(name)
    if not m:
        return None
    kind, index, rest = m.groups()
    bfl_kind = "double_blocks" if kind == "transformer_blocks" else "single_blocks"
    plain, fused = (DOUBLE, DOUBLE_FUSED) if bfl_kind == "double_blocks" else (SINGLE, SINGLE_FUSED)
    for bfl, diffusers in plain.items():
        if rest == diffusers:
            return f"{bfl_kind}.{index}.{bfl}", 0
    for bfl, parts in fused.items():
        if rest in parts:
            return f"{bfl_kind}.{index}.{bfl}", parts.index(rest)
    return None


def fused_parts(name: str) -> int:
    """How many diffusers modules the BFL module `name` fuses (1: not fused)."""
    return len(to_diffusers(name) or (name,))


def part_sizes(name: str, hidden: int) -> list[int]:
    """The output rows of each part of the fused BFL module `name`, from the hidden width."""
    if name.endswith(".linear1"):
        return [hidden] * 3 + [MLP_RATIO * hidden]
    return [hidden] * 3


# the RMS norms on q and k, which hold a `scale` in BFL's QKNorm and a `weight` in diffusers' RMSNorm
DOUBLE_NORMS = {"img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale":
                "attn.norm_k.weight", "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
                "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight"}
SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
PARAMS = ("weight", "bias")


def key_to_diffusers(key: str) -> tuple[str, ...] | None:
    """The diffusers key(s) a BFL key is (several for a fused module's weight or bias); None for a key that is not
    Flux.1's."""
    m = BLOCK.fullmatch(key)
    if m:
        kind, index, rest = m.groups()
        norms = DOUBLE_NORMS if kind == "double_blocks" else SINGLE_NORMS
        if rest in norms:
            return (f"{KIND[kind]}.{index}.{norms[rest]}",)
    module, _, param = key.rpartition(".")
    parts = to_diffusers(module) if param in PARAMS else None
    return tuple(f"{p}.{param}" for p in parts) if parts else None


def key_to_original(key: str) -> tuple[str, int] | None:
    """The BFL key a diffusers key belongs to and its place among a fused module's parts; None for a key that is
    not FluxTransformer2DModel's."""
    m = DIFFUSERS_BLOCK.fullmatch(key)
    if m:
        kind, index, rest = m.groups()
        bfl_kind = "double_blocks" if kind == "transformer_blocks" else "single_blocks"
        norms = DOUBLE_NORMS if bfl_kind == "double_blocks" else SINGLE_NORMS
        for bfl, diffusers in norms.items():
            if rest == diffusers:
                return f"{bfl_kind}.{index}.{bfl}", 0
    module, _, param = key.rpartition(".")
    found = to_original(module) if param in PARAMS else None
    return (f"{found[0]}.{param}", found[1]) if found else None
