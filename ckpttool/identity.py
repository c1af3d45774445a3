"""What a weights file is, from its keys and shapes alone (`inspect`'s `identity`): a LoRA, in which key convention,
with its rank and alpha (and the family, where its module names show it); a model in the original single-file
layout, with its family and variant as diffusers' from_single_file decides them, or in diffusers' own layout (a Flux
transformer, a UNet). What no signature says is None: never guessed.

The conventions, as the tools that write and load them spell their keys:
- kohya (sd-scripts networks/lora.py LoRANetwork: `lora_unet_` / `lora_te_` / `lora_te1_` / `lora_te2_` module names,
  `.lora_down.weight`, `.lora_up.weight`, `.alpha`; diffusers lora_pipeline.py tells it by ".lora_down.weight");
- peft (save_pretrained of a PeftModel: `base_model.model.` before the module path, `.lora_A.weight` and
  `.lora_B.weight`; its alpha lives in adapter_config.json; diffusers tells it by "base_model.model.");
- diffusers (save_lora_weights: the pipeline component first, `unet.`, `transformer.`, `text_encoder.`,
  `text_encoder_2.`, then peft's `.lora_A.weight` / `.lora_B.weight`, or the older attention processors'
  `.lora.down.weight` / `.lora.up.weight`);
- original (the model's own single-file keys under `diffusion_model.` with `.lora_A.weight` / `.lora_B.weight`, as
  ai-toolkit saves them; diffusers tells them by "diffusion_model.");
- comfy (the same keys with kohya's `.lora_down.weight` / `.lora_up.weight`, as ComfyUI's own LoraSave writes them:
  comfy_extras/nodes_lora_extract.py; ComfyUI's comfy/lora.py loads both).
"""

from __future__ import annotations

import re
import struct

from ckpttool.model import Checkpoint, TensorInfo

DOWN = re.compile(r"(.+)(?:\.lora_down|\.lora_A|[._]lora\.down|\.lora_A\.default)\.weight")  # the LoRA's first matrix
UP = re.compile(r"(.+)(?:\.lora_up|\.lora_B|[._]lora\.up|\.lora_B\.default)\.weight")
KOHYA_MODULE = re.compile(r"lora_(?:unet|te\d?|transformer|te_text_model)_")
DIFFUSERS_COMPONENTS = ("unet.", "transformer.", "text_encoder.", "text_encoder_2.", "prior.", "decoder.")
ALPHAS_READ = 4096  # `.alpha` scalars read at most (one per module; each a few bytes)


def identify(ckpt: Checkpoint) -> dict | None:
    """{"kind", "family", "variant", "convention", ...} where the keys say what the file is (a LoRA: also "rank",
    "alpha", "modules"); None where they do not."""
    return identify_tensors([t for c in ckpt.components if c.role in ("model", "extra") for t in c.tensors],
                            ckpt.metadata)


def identify_tensors(tensors: list[TensorInfo], metadata: dict) -> dict | None:
    """identify() of these tensors (one component of a pipeline, say), with the file's header metadata."""
    downs = {m.group(1): t for t in tensors if (m := DOWN.fullmatch(t.name))}
    ups = {m.group(1): t for t in tensors if (m := UP.fullmatch(t.name))}
    if not downs or not ups or len(set(downs) & set(ups)) < max(1, len(downs) // 2):
        return _model(tensors)
    ranks = sorted({int(t.shape[0]) for t in downs.values() if t.shape})
    family = _lora_family(downs, ups)
    return {"kind": "lora", "family": family, "variant": _lora_variant(family, downs),
            "convention": _convention(downs), "rank": ranks[0] if len(ranks) == 1 else ranks,
            "alpha": _alpha(tensors, metadata), "modules": len(downs)}


# Flux.1's blocks under its original names (BFL flux/model.py `double_blocks`, `single_blocks`: kohya's lora_flux.py
# and ai-toolkit keep them) and under diffusers' (FluxTransformer2DModel `single_transformer_blocks`, with dots or
# kohya's underscores); SDXL's second
# text encoder (kohya `lora_te2_`, diffusers `text_encoder_2.`)
LORA_FAMILIES = (("flux.1", re.compile(r"(?:.*[._])?(?:double_blocks|single_blocks|single_transformer_blocks)[._]\d")),
                 ("sdxl", re.compile(r"lora_te2_|text_encoder_2\.")))


# a UNet's cross-attention key projection takes the text encoder's width, cross_attention_dim: 768 for SD1's CLIP-L,
# 1024 for SD2's OpenCLIP-H, 2048 for SDXL's two encoders side by side (the model repos' unet/config.json); a LoRA's
# down matrix there too. Only inside a UNet's blocks: DiT models name cross-attention attn2 as well, at other widths
UNET_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
UNET_CROSS_KEY = re.compile(r".*(?:down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)"
                            r"[._].*attn2[._]to_k")
# a Flux.1 LoRA on the image input (BFL `img_in`, diffusers `x_embedder`) takes its channels: 384 in Fill, 128 in
# Depth (their transformer configs' in_channels); 64 is dev's and schnell's alike, so not told
FLUX_INPUT = re.compile(r".*(?:img_in|x_embedder)")


def _lora_family(downs: dict[str, TensorInfo], ups: dict[str, TensorInfo]) -> str | None:
    """The model family a LoRA's module names (and its cross-attention's text width) show, where every signature
    agrees; None (not told) otherwise."""
    found = {family for family, pattern in LORA_FAMILIES if any(pattern.match(m) for m in downs)}
    if "flux.1" in found and not _flux1_widths(downs, ups):
        return None
    found |= {UNET_WIDTHS.get(t.shape[1]) for m, t in downs.items()
              if len(t.shape) == 2 and UNET_CROSS_KEY.match(m)}
    if None in found:  # a cross-attention width no known UNet has
        return None
    return found.pop() if len(found) == 1 else None


def _flux1_widths(downs: dict[str, TensorInfo], ups: dict[str, TensorInfo]) -> bool:
    """Whether the blocks' names are Flux.1's and not a kin's: Flux.2's modulations are shared across blocks
    (`double_stream_modulation_img`, `single_stream_modulation`), and a single block's linear1 gives q, k, v and
    an MLP input mlp_ratio 4 wide: 7 times its input (Flux.2's gated MLP makes it 9)."""
    if any("stream_modulation" in m for m in downs):
        return False
    for m, down in downs.items():
        if re.search(r"single_blocks[._]\d+[._]linear1$", m) and m in ups and len(down.shape) == 2:
            if ups[m].shape[0] != 7 * down.shape[1]:
                return False
    return True


def _lora_variant(family: str | None, downs: dict[str, TensorInfo]) -> str | None:
    if family != "flux.1":
        return None
    widths = {t.shape[1] for m, t in downs.items() if len(t.shape) == 2 and FLUX_INPUT.fullmatch(m)}
    return {384: "fill", 128: "depth"}.get(widths.pop()) if len(widths) == 1 else None


# diffusers loaders/single_file_utils.py CHECKPOINT_KEY_NAMES and infer_diffusers_model_type (0.42.1), for the
# original single-file layouts (LDM/SGM `model.diffusion_model.`, BFL's own keys, with or without that prefix)
DM = "model.diffusion_model."
INPAINT, V1 = DM + "input_blocks.0.0.weight", DM + "output_blocks.11.0.skip_connection.weight"
V2 = DM + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
XL_BASE = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"
XL_REFINER = "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias"
SD3 = "joint_blocks.0.context_block.adaLN_modulation.1.bias"
SD35_LARGE = "joint_blocks.37.x_block.mlp.fc1.weight"
FLUX = "double_blocks.0.img_attn.norm.key_norm.scale"
FLUX_KIN = (("flux.2", "single_stream_modulation.lin.weight"), ("flux.3", "early_stream_modulations.image.lin.weight"),
            ("chroma", "distilled_guidance_layer.in_proj.bias"))
OTHERS = (("ltx-video", ("patchify_proj.weight", "transformer_blocks.27.scale_shift_table")),
          ("hunyuan-video", ("txt_in.individual_token_refiner.blocks.0.adaLN_modulation.1.bias",)),
          ("wan", ("head.modulation",)), ("z-image", ("layers.0.adaLN_modulation.0.weight",)),
          ("lumina2", ("cap_embedder.0.weight",)))
# parts a single-file checkpoint holds beside its diffusion model: the VAE, the text encoder(s)
OTHER_PARTS = ("first_stage_model.", "cond_stage_model.", "conditioner.", "text_encoders.", "vae.")


def _model(tensors: list[TensorInfo]) -> dict | None:
    """Family and variant of a model in the original single-file layout, by the keys and shapes diffusers'
    from_single_file decides by; None where none of them is there (not told, never guessed)."""
    shapes = {t.name: tuple(t.shape) for t in tensors}

    def has(key: str) -> bool:  # with the checkpoint's `model.diffusion_model.` prefix or without it
        return key in shapes or DM + key in shapes

    def shape(key: str) -> tuple:
        return shapes.get(key) or shapes.get(DM + key) or ()

    family = variant = None
    if INPAINT in shapes and shape(INPAINT)[1:2] == (9,):
        family, variant = ("sd2" if shape(V2)[-1:] == (1024,) else "sdxl" if XL_BASE in shapes else "sd1"), "inpaint"
    elif shape(V2)[-1:] == (1024,):
        family = "sd2"
    elif XL_BASE in shapes:
        family, variant = "sdxl", "base"
    elif XL_REFINER in shapes:
        family, variant = "sdxl", "refiner"
    elif has(SD3) and shape(SD3)[-1:] == (9216,):
        family, variant = "sd3", {(1, 36864): "medium", (1, 147456): "3.5-medium"}.get(shape("pos_embed")[:2])
    elif has(SD35_LARGE):
        family, variant = "sd3", "3.5-large"
    elif has(FLUX) and (kin := next((name for name, key in FLUX_KIN if has(key)), None)):
        family = kin  # Flux.1's architecture, changed: diffusers tells these apart before Flux.1
    elif has(FLUX):
        family = "flux.1"
        width = shape("img_in.weight")[1:2]  # the image input's channels: 64, or the conditioning's added
        variant = {(384,): "fill", (128,): "depth"}.get(width, "dev") if has("guidance_in.in_layer.bias") else "schnell"
    elif V1 in shapes:
        family = "sd1"
    else:
        family = next((name for name, keys in OTHERS if any(has(k) for k in keys)), None)
    if family is None and any(k.startswith(DM + "input_blocks.") for k in shapes):
        # a UNet alone in the LDM/SGM layout (no text encoder's keys to go by): its cross-attention's text width
        widths = {s[-1] for k, s in shapes.items() if k.startswith(DM) and k.endswith("attn2.to_k.weight")}
        family = UNET_WIDTHS.get(widths.pop()) if len(widths) == 1 else None
    if family is None:
        return _diffusers_model(shapes) or _language_model(shapes) or _pipeline_part(shapes)
    whole = any(k.startswith(DM) for k in shapes) and any(k.startswith(OTHER_PARTS) for k in shapes)
    return {"kind": "checkpoint" if whole else "diffusion_model", "family": family, "variant": variant,
            "convention": "original"}




# a ControlNet beside the model (FluxControlNetModel, ControlNetModel: `controlnet_` blocks), or Chroma's transformer
# (Flux.1's blocks with a distilled guidance layer for the modulations): built like the model, not the model
NOT_THE_MODEL = ("controlnet_", "distilled_guidance_layer.")


# diffusers' own models: FluxTransformer2DModel (transformer_flux.py: `single_transformer_blocks`, `x_embedder` of
# in_channels, `time_text_embed.guidance_embedder` only with guidance_embeds), UNet2DConditionModel (UNET_WIDTHS)
def _diffusers_model(shapes: dict) -> dict | None:
    if any(k.startswith(NOT_THE_MODEL) for k in shapes):
        return None
    if "single_transformer_blocks.0.attn.to_q.weight" in shapes and "x_embedder.weight" in shapes:
        width = shapes["x_embedder.weight"][1:2]
        variant = ({(384,): "fill", (128,): "depth"}.get(width, "dev")
                   if "time_text_embed.guidance_embedder.linear_1.weight" in shapes else "schnell")
        return {"kind": "diffusion_model", "family": "flux.1", "variant": variant, "convention": "diffusers"}
    if "conv_in.weight" in shapes and "mid_block.resnets.0.conv1.weight" in shapes and any(
            k.startswith("down_blocks.") for k in shapes):
        widths = {s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight") and len(s) == 2}
        family = UNET_WIDTHS.get(widths.pop()) if len(widths) == 1 else None
        inpaint = shapes["conv_in.weight"][1:2] == (9,)
        return {"kind": "diffusion_model", "family": family, "variant": "inpaint" if inpaint else None,
                "convention": "diffusers"}
    return None


# transformers' causal language models (modeling_llama.py, modeling_qwen2.py, modeling_qwen3.py, modeling_gpt2.py).
# The Llama layout (per layer only `self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`, `input_layernorm`,
# `post_attention_layernorm`) is shared key for key by Mistral, Gemma, Granite, ERNIE 4.5 and more: told as `layout`
# "llama", and as family "llama" only with Llama 3's 128256-token vocabulary. Qwen2 adds biases to q, k and v (not o,
# and none on its RMS norms), Qwen3 RMS norms on q and k; GPT-2 fuses q, k and v in `attn.c_attn`, a Conv1D of
# width x 3 width (GPT-BigCode's multi-query one is narrower).
LLAMA_LAYER = {"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
               "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
               "input_layernorm.weight", "post_attention_layernorm.weight"}
QKV_BIASES = {"self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"}
QK_NORMS = {"self_attn.q_norm.weight", "self_attn.k_norm.weight"}
LLAMA3_VOCABULARY = 128256


def _language_model(shapes: dict) -> dict | None:
    names = {k.removeprefix("model."): s for k, s in shapes.items()}  # a ForCausalLM's base model under `model.`
    attn = next((s for k, s in names.items() if re.fullmatch(r"(?:transformer\.)?h\.0\.attn\.c_attn\.weight", k)),
                None)
    embed = next((s for k, s in names.items() if re.fullmatch(r"(?:transformer\.)?wte\.weight", k)), None)
    if attn and embed and len(attn) == 2 and len(embed) == 2 and tuple(attn) == (embed[1], 3 * embed[1]):
        return {"kind": "model", "family": "gpt2", "variant": None, "convention": "transformers"}
    layer = {k[len("layers.0."):] for k in names if k.startswith("layers.0.")}
    if not LLAMA_LAYER <= layer:
        return None
    extra = layer - LLAMA_LAYER
    if extra == QKV_BIASES:
        family = "qwen2"
    elif extra == QK_NORMS:
        family = "qwen3"
    elif extra:
        return None
    else:
        vocabulary = names.get("embed_tokens.weight", ())[:1]
        family = "llama" if vocabulary == (LLAMA3_VOCABULARY,) else None
    return {"kind": "model", "family": family, "variant": None, "convention": "transformers", "layout": "llama"}


# a pipeline's other parts saved alone: a VAE (the LDM names of a single file's `first_stage_model.` or BFL's ae,
# and diffusers' AutoencoderKL), a text encoder (transformers' CLIPTextModel and T5EncoderModel, OpenCLIP's text
# tower). Their families are not told: SD, SDXL and SD3/Flux VAEs differ in weights and latent width only.
PARTS = (("vae", "original", ("encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight")),
         ("vae", "diffusers", ("encoder.down_blocks.0.resnets.0.conv1.weight",
                               "decoder.up_blocks.0.resnets.0.conv1.weight")),
         ("text_encoder", "transformers", ("text_model.encoder.layers.0.self_attn.q_proj.weight",)),
         ("text_encoder", "transformers", ("encoder.layers.0.self_attn.q_proj.weight",
                                           "embeddings.token_embedding.weight")),
         ("text_encoder", "transformers", ("encoder.block.0.layer.0.SelfAttention.q.weight",)),
         ("text_encoder", "original", ("transformer.resblocks.0.attn.in_proj_weight", "token_embedding.weight")))


def _pipeline_part(shapes: dict) -> dict | None:
    found = {(kind, convention) for kind, convention, keys in PARTS if all(k in shapes for k in keys)}
    if len(found) != 1:
        return None
    kind, convention = found.pop()
    return {"kind": kind, "family": None, "variant": None, "convention": convention}


def _convention(downs: dict[str, TensorInfo]) -> str | None:
    """The key convention every module name follows; None where they follow none of them, or several."""
    def one(name: str) -> str | None:
        if KOHYA_MODULE.match(name):
            return "kohya"
        if name.startswith("base_model.model."):
            return "peft"
        if name.startswith("diffusion_model."):  # ComfyUI's own LoraSave: kohya's matrix names on its model's keys
            return "comfy" if downs[name].name.endswith(".lora_down.weight") else "original"
        if name.startswith(DIFFUSERS_COMPONENTS):
            return "diffusers"
        return None

    found = {one(m) for m in downs}
    return found.pop() if len(found) == 1 else None


def _bf16(info: TensorInfo) -> float | None:
    """A bfloat16 scalar: the high half of a float32."""
    with open(info.location.file, "rb") as f:
        f.seek(info.location.offset + info.location.storage_offset * 2)
        data = f.read(2)
    return struct.unpack("<f", b"\x00\x00" + data)[0] if len(data) == 2 else None


def _alpha(tensors: list[TensorInfo], metadata: dict) -> float | list | None:
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
    # diffusers writes one entry per component, `unet.lora_alpha`, `text_encoder.lora_alpha` (lora_base.py
    # _pack_dict_with_prefix); a plain adapter config has `lora_alpha`
    found = sorted({float(v) for k, v in adapter_metadata(metadata).items()
                    if str(k).rpartition(".")[2] == "lora_alpha" and type(v) in (int, float)})
    return found[0] if len(found) == 1 else found or None


def adapter_metadata(metadata: dict) -> dict:
    """The LoraConfig diffusers' save_lora_weights writes into a safetensors header (`lora_adapter_metadata`, JSON:
    `<component>.lora_alpha`, `<component>.alpha_pattern`, ...); {} where there is none or it does not parse."""
    import json

    raw = metadata.get("lora_adapter_metadata")
    try:
        value = json.loads(raw) if isinstance(raw, str) else raw
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


KIND_WORDS = {"lora": "LoRA", "diffusion_model": "diffusion model", "checkpoint": "single-file checkpoint"}


def described(identity: dict) -> str:
    """`a flux.1 fill LoRA (kohya)`, `a sdxl base single-file checkpoint (original)`."""
    words = [identity.get("family"), identity.get("variant"), KIND_WORDS.get(identity["kind"], identity["kind"])]
    convention = identity.get("convention")
    return "a " + " ".join(w for w in words if w) + (f" ({convention})" if convention else "")


def apart(a: dict | None, b: dict | None) -> str | None:
    """Why A and B are not for each other by what they are (a Flux.1 fill LoRA against a Flux.1 dev model), or None
    where what they are does not say (a family or variant not told is never taken for a difference)."""
    if not a or not b:
        return None
    if a.get("family") and b.get("family") and a["family"] != b["family"]:
        return f"A is {described(a)}, B {described(b)}: they are for different model families"
    if a.get("family") and a.get("variant") and b.get("variant") and a["variant"] != b["variant"]:
        return f"A is {described(a)}, B {described(b)}: made for different variants of {a['family']} " \
               f"({a['variant']}, {b['variant']})"
    if (a["kind"] == "lora") != (b["kind"] == "lora"):
        return f"A is {described(a)}, B {described(b)}: a LoRA's keys are adapter matrices, applied to a model's " \
               "weights, never loaded in their place; compare a LoRA with a LoRA, a model with a model"
    return None
