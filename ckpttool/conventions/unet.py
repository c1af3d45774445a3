"""The Stable Diffusion UNet under the LDM/SGM module names (the original single files, kohya's SDXL UNet:
`input_blocks`, `middle_block`, `output_blocks`) and under diffusers' (UNet2DConditionModel: `down_blocks`,
`mid_block`, `up_blocks`), paired as diffusers' single_file_utils.py `convert_ldm_unet_checkpoint` and
lora_conversion_utils.py `_maybe_map_sgm_blocks_to_diffusers` / `_convert_unet_lora_key` pair them (0.42.1).

Every family has two layers per block (`layers_per_block` 2 in SD1, SD2 and SDXL's unet/config.json); which blocks
hold attention differs: SD1/SD2 CrossAttnDownBlock2D x3 then DownBlock2D, SDXL DownBlock2D then CrossAttnDownBlock2D
x2 (the up blocks mirror them)."""

from __future__ import annotations

from functools import lru_cache

LAYERS = 2
ATTENTION = {"sd1": ((True, True, True, False), (False, True, True, True)),
             "sd2": ((True, True, True, False), (False, True, True, True)),
             "sdxl": ((False, True, True), (True, True, False))}
# inside a ResBlock (LDM) / ResnetBlock2D (diffusers), a Downsample's `op` / diffusers' `conv`
RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
          "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
OUTSIDE = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
           "time_embed.2": "time_embedding.linear_2", "label_emb.0.0": "add_embedding.linear_1",
           "label_emb.0.2": "add_embedding.linear_2", "out.0": "conv_norm_out", "out.2": "conv_out"}


@lru_cache(maxsize=None)
def block_pairs(family: str) -> tuple[tuple[str, str, str], ...]:
    """(LDM prefix, diffusers prefix, what it is: "resnet", "attention", "down", "up" or "other") for every
    block of the family's UNet."""
    down, up = ATTENTION[family]
    pairs = [(ldm, dif, "other") for ldm, dif in OUTSIDE.items()]
    for b, attn in enumerate(down):
        for layer in range(LAYERS):
            i = 1 + b * (LAYERS + 1) + layer
            pairs.append((f"input_blocks.{i}.0", f"down_blocks.{b}.resnets.{layer}", "resnet"))
            if attn:
                pairs.append((f"input_blocks.{i}.1", f"down_blocks.{b}.attentions.{layer}", "attention"))
        if b < len(down) - 1:
            pairs.append((f"input_blocks.{1 + b * (LAYERS + 1) + LAYERS}.0.op", f"down_blocks.{b}.downsamplers.0.conv",
                          "down"))
    pairs += [("middle_block.0", "mid_block.resnets.0", "resnet"), ("middle_block.1", "mid_block.attentions.0",
                                                                    "attention"),
              ("middle_block.2", "mid_block.resnets.1", "resnet")]
    for b, attn in enumerate(up):
        for layer in range(LAYERS + 1):
            i = b * (LAYERS + 1) + layer
            pairs.append((f"output_blocks.{i}.0", f"up_blocks.{b}.resnets.{layer}", "resnet"))
            if attn:
                pairs.append((f"output_blocks.{i}.1", f"up_blocks.{b}.attentions.{layer}", "attention"))
        if b < len(up) - 1:
            last = b * (LAYERS + 1) + LAYERS
            pairs.append((f"output_blocks.{last}.{2 if attn else 1}.conv", f"up_blocks.{b}.upsamplers.0.conv", "up"))
    return tuple(pairs)


def _translate(name: str, family: str, to_diffusers: bool) -> str | None:
    for ldm, dif, what in block_pairs(family):
        src, dst = (ldm, dif) if to_diffusers else (dif, ldm)
        if name == src and what in ("down", "up", "other"):
            return dst
        if not name.startswith(src + "."):
            continue
        rest = name[len(src) + 1:]
        if what == "resnet":
            table = RESNET if to_diffusers else {v: k for k, v in RESNET.items()}
            return f"{dst}.{table[rest]}" if rest in table else None
        return f"{dst}.{rest}" if what == "attention" else None
    return None


def to_diffusers(name: str, family: str) -> str | None:
    """The diffusers UNet module an LDM/SGM module is; None where the family's UNet has no such module."""
    return _translate(name, family, True)


def to_original(name: str, family: str) -> str | None:
    """The LDM/SGM module a diffusers UNet module is; None where the family's UNet has no such module."""
    return _translate(name, family, False)
