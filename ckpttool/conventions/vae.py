"""The Stable Diffusion VAE under the LDM names of the single-file checkpoints (`first_stage_model.encoder.down.0
.block.0`, `mid.attn_1.q` as 1x1 convolutions) and under diffusers' AutoencoderKL (`encoder.down_blocks.0.resnets.0`,
`mid_block.attentions.0.to_q` as linear layers), paired as diffusers' single_file_utils.py
`convert_ldm_vae_checkpoint` pairs them (0.42.1): the decoder's up blocks run in the opposite order."""

from __future__ import annotations

import re

# (LDM, diffusers) name pieces, in a resnet, a mid attention, and outside the blocks
RESNET = {"nin_shortcut": "conv_shortcut"}
ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
OUTSIDE = {"encoder.norm_out": "encoder.conv_norm_out", "decoder.norm_out": "decoder.conv_norm_out"}
SAME = ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out", "quant_conv", "post_quant_conv")
RESNET_BACK = {v: k for k, v in RESNET.items()}
ATTENTION_BACK = {v: k for k, v in ATTENTION.items()}
LDM = re.compile(r"(encoder|decoder)\.(?:(down|up)\.(\d+)\.(block\.(\d+)|downsample|upsample)|mid\.(block_(\d)|attn_1))"
                 r"\.(.+)")
DIFFUSERS = re.compile(r"(encoder|decoder)\.(?:(down_blocks|up_blocks)\.(\d+)\.(resnets\.(\d+)|downsamplers\.0|"
                       r"upsamplers\.0)|mid_block\.(resnets\.(\d)|attentions\.0))\.(.+)")


def to_diffusers(name: str, up_blocks: int) -> tuple[str, bool] | None:
    """(diffusers key, whether the weight changes from a 1x1 convolution to a linear layer) of an LDM VAE key."""
    module, _, param = name.rpartition(".")
    if module in OUTSIDE:
        return f"{OUTSIDE[module]}.{param}", False
    m = LDM.fullmatch(name)
    if not m:
        return (name, False) if module in SAME else None
    side, kind, index, inner, block, mid, mid_block, rest = m.groups()
    if kind:
        index = int(index) if kind == "down" else up_blocks - 1 - int(index)
        prefix = f"{side}.{kind}_blocks.{index}."
        if inner.startswith("block"):
            return prefix + f"resnets.{block}." + _renamed(rest, RESNET), False
        return prefix + ("downsamplers.0." if kind == "down" else "upsamplers.0.") + rest, False
    if mid_block:
        return f"{side}.mid_block.resnets.{int(mid_block) - 1}." + _renamed(rest, RESNET), False
    inner_module, _, param = rest.rpartition(".")
    if inner_module not in ATTENTION:
        return None
    return f"{side}.mid_block.attentions.0.{ATTENTION[inner_module]}.{param}", param == "weight" and \
        inner_module != "norm"


def to_original(name: str, up_blocks: int) -> tuple[str, bool] | None:
    """(LDM key, whether the weight changes from a linear layer to a 1x1 convolution) of a diffusers VAE key."""
    module, _, param = name.rpartition(".")
    for ldm, dif in OUTSIDE.items():
        if module == dif:
            return f"{ldm}.{param}", False
    m = DIFFUSERS.fullmatch(name)
    if not m:
        return (name, False) if module in SAME else None
    side, kind, index, inner, block, mid, mid_block, rest = m.groups()
    if kind:
        index = int(index) if kind == "down_blocks" else up_blocks - 1 - int(index)
        prefix = f"{side}.{kind[:-len('_blocks')]}.{index}."
        if inner.startswith("resnets"):
            return prefix + f"block.{block}." + _renamed(rest, RESNET_BACK), False
        return prefix + ("downsample." if kind == "down_blocks" else "upsample.") + rest, False
    if mid_block:
        return f"{side}.mid.block_{int(mid_block) + 1}." + _renamed(rest, RESNET_BACK), False
    inner_module, _, param = rest.rpartition(".")
    if inner_module not in ATTENTION_BACK:
        return None
    return (f"{side}.mid.attn_1.{ATTENTION_BACK[inner_module]}.{param}",
            param == "weight" and inner_module != "group_norm")


def _renamed(rest: str, table: dict) -> str:
    module, _, param = rest.rpartition(".")
    return f"{table.get(module, module)}.{param}"
