"""Whole models between diffusers' layout and the original single file (`convert --to original|diffusers`), key by
key: Flux.1's transformer (BFL's own keys, as flux1-dev.safetensors holds them: q, k, v fused into `qkv`, and with
the MLP input into `linear1`, the final modulation's halves in the other order), the SD1/SD2/SDXL UNet (the LDM/SGM
names under `model.diffusion_model.`), and a whole SD1/SDXL checkpoint with its VAE (vae.py) and text encoders
(clip.py). Every output tensor is a plan of pieces of input tensors (conventions/pieces.py), so nothing is read
before the whole output is known, and each one is built alone. A key this cannot place stops the conversion with
its name."""

from __future__ import annotations

from dataclasses import dataclass, field

from ckpttool.conventions import clip, flux, unet, vae
from ckpttool.conventions.pieces import Matrix, Piece, stacked
from ckpttool.errors import CkptError
from ckpttool.model import Code, TensorInfo

UNET_PREFIX = "model.diffusion_model."
FLUX_PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # ComfyUI's and some trainers' saves add one
FAMILIES = ("flux.1", "sd1", "sd2", "sdxl")
# Flux.1's rotary embedding splits each head's 128 channels (16, 56, 56) (diffusers' FluxTransformer2DModel
# default, BFL's FluxParams axes_dim); the weights do not hold it
FLUX_ROPE = {128: [16, 56, 56]}
# the UNet settings the weights cannot show (heads per block; SDXL's added conditioning's time embedding; the latent
# size pipelines default to), as the model repos' unet/config.json have them (stable-diffusion-v1-5,
# stable-diffusion-2-1, stable-diffusion-xl-base-1.0); SD2's base and 768-v models differ there, so it is left out
SETTINGS = {"sdxl": {"attention_head_dim": [5, 10, 20], "addition_time_embed_dim": 256, "sample_size": 128},
            "sd1": {"attention_head_dim": 8, "sample_size": 64},
            "sd2": {"attention_head_dim": [5, 10, 20, 20]}}
CHANNELS = {"sdxl": [320, 640, 1280], "sd1": [320, 640, 1280, 1280], "sd2": [320, 640, 1280, 1280]}


@dataclass
class Plan:
    outputs: dict = field(default_factory=dict)  # name -> Matrix, in writing order
    left: list = field(default_factory=list)  # input keys of other parts of a whole checkpoint, not converted
    config: dict | None = None  # config.json of the diffusers model written
    notes: list = field(default_factory=list)

    def put(self, name: str, matrix: Matrix):
        if name in self.outputs:
            raise CkptError(Code.KEY_MISMATCH, f"two inputs would both be written as {name}; nothing written")
        self.outputs[name] = matrix


def to_original(tensors: list[TensorInfo], family: str) -> Plan:
    """A diffusers model's tensors under the original single file's keys."""
    plan = Plan()
    if family == "flux.1":
        fused = _by_original_key(tensors, flux.key_to_original, "{}: not a key of diffusers' FluxTransformer2DModel")
        for name, parts in fused.items():
            names = flux.key_to_diffusers(name)
            if len(names) == 1:
                plan.put(name, Matrix.of(Piece(parts[0], swap=_swapped(name, parts[0]))))
            else:
                plan.put(name, _concatenated(name, parts, names))
        return plan
    for t in tensors:
        module, _, param = t.name.rpartition(".")
        name = unet.to_original(module, family)
        if name is None:
            raise CkptError(Code.KEY_MISMATCH, f"{t.name}: not a key of {family}'s UNet2DConditionModel; nothing "
                            "written")
        plan.put(f"{UNET_PREFIX}{name}.{param}", Matrix.of(Piece(t)))
    return plan


# where a single-file checkpoint holds each pipeline component (diffusers single_file_utils.py LDM_VAE_KEYS,
# LDM_CLIP_PREFIX_TO_REMOVE, convert_open_clip_checkpoint's prefix for SDXL); SD1's text encoder is CLIP-L, SDXL's
# second OpenCLIP bigG. SD2's OpenCLIP-H single file holds a 24th layer its diffusers text encoder drops, so SD2
# converts its UNet and VAE only.
CHECKPOINT_PARTS = {"sdxl": {"unet": UNET_PREFIX, "vae": "first_stage_model.",
                             "text_encoder": "conditioner.embedders.0.transformer.",
                             "text_encoder_2": "conditioner.embedders.1.model."},
                    "sd1": {"unet": UNET_PREFIX, "vae": "first_stage_model.",
                            "text_encoder": "cond_stage_model.transformer."},
                    "sd2": {"unet": UNET_PREFIX, "vae": "first_stage_model."}}
OPEN_CLIP = "conditioner.embedders.1.model."
WEIGHTS_FILE = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}


def pipeline_to_original(parts: dict[str, list[TensorInfo]], family: str) -> Plan:
    """A diffusers pipeline's UNet, VAE and text encoders in one single-file checkpoint's keys (Flux.1: the
    transformer alone, as BFL ships it; its VAE and text encoders are files of their own)."""
    if family == "flux.1":
        plan = to_original(parts["transformer"], family)
        plan.left = [f"{name}/{t.name}" for name, tensors in parts.items() if name != "transformer" for t in tensors]
        return plan
    plan = Plan()
    for name, tensors in parts.items():
        prefix = CHECKPOINT_PARTS[family].get(name)
        if prefix is None:
            plan.left += [f"{name}/{t.name}" for t in tensors]
            continue
        part = (to_original(tensors, family) if name == "unet" else _vae_to_original(tensors, prefix)
                if name == "vae" else _open_clip_to_original(tensors, prefix) if prefix == OPEN_CLIP
                else _clip_to_original(tensors, prefix))
        for key, matrix in part.outputs.items():
            plan.put(key, matrix)
    return plan


def checkpoint_to_diffusers(tensors: list[TensorInfo], family: str) -> dict[str, Plan]:
    """A single-file checkpoint's components, each in diffusers' keys with its config; keys of no component the
    family's checkpoint holds are `left` on the first plan."""
    prefixes = CHECKPOINT_PARTS[family]
    found: dict[str, list] = {name: [] for name in prefixes}
    left = []
    for t in tensors:
        name = next((n for n, p in prefixes.items() if t.name.startswith(p)), None)
        (found[name] if name else left).append(t)
    plans = {}
    for name, part in found.items():
        if not part:
            continue
        plans[name] = (to_diffusers(part, family) if name == "unet" else _vae_to_diffusers(part, prefixes[name], family)
                       if name == "vae" else _clip_to_diffusers(part, prefixes[name], prefixes[name] == OPEN_CLIP))
    if not plans:
        raise CkptError(Code.NO_TENSORS, f"no key under the {family} checkpoint's prefixes "
                        f"({', '.join(prefixes.values())}); nothing written")
    next(iter(plans.values())).left += [t.name for t in left]
    return plans


def _vae_to_original(tensors: list[TensorInfo], prefix: str) -> Plan:
    plan, up = Plan(), _count_blocks(tensors, "decoder.up_blocks.")
    for t in tensors:
        found = vae.to_original(t.name, up)
        if found is None:
            raise CkptError(Code.KEY_MISMATCH, f"vae/{t.name}: not a key of diffusers' AutoencoderKL; nothing written")
        name, conv = found
        plan.put(prefix + name, Matrix.of(Piece(t, view=(*t.shape, 1, 1) if conv else None)))
    return plan


def _vae_to_diffusers(tensors: list[TensorInfo], prefix: str, family: str) -> Plan:
    plan = Plan()
    up = _count_blocks([TensorInfo(t.name[len(prefix):], t.dtype, t.shape) for t in tensors], "decoder.up.")
    for t in tensors:
        found = vae.to_diffusers(t.name[len(prefix):], up)
        if found is None:
            raise CkptError(Code.KEY_MISMATCH, f"{t.name}: not a key of the LDM VAE; nothing written")
        name, linear = found
        plan.put(name, Matrix.of(Piece(t, view=tuple(t.shape[:2]) if linear and len(t.shape) == 4 else None)))
    plan.config = _config(_vae_config, plan.outputs, family)
    if "scaling_factor" not in plan.config:
        plan.notes.append(f"VAE widths {plan.config['block_out_channels']} are not the SD VAE's {VAE_CHANNELS}: its "
                          "latent scaling_factor is not in the weights; set it in vae/config.json")
    return plan


def _count_blocks(tensors: list[TensorInfo], prefix: str) -> int:
    return len({t.name[len(prefix):].partition(".")[0] for t in tensors if t.name.startswith(prefix)})


def _clip_to_original(tensors: list[TensorInfo], prefix: str) -> Plan:
    """CLIP-L under the checkpoint's prefix, with transformers' `text_model.` level (transformers 5 saves
    CLIPTextModel without it; the single files and the model repos' files have it)."""
    plan = Plan()
    for t in tensors:
        name = t.name if t.name.startswith(("text_model.", "text_projection")) else "text_model." + t.name
        plan.put(prefix + name, Matrix.of(Piece(t)))
    return plan


def _open_clip_to_original(tensors: list[TensorInfo], prefix: str) -> Plan:
    plan = Plan()
    fused = _by_original_key(tensors, clip.transformers_to_open_clip,
                             "text_encoder_2/{}: not a key of an OpenCLIP text encoder diffusers converts")
    for name, parts in fused.items():
        if name in clip.TRANSPOSED:
            plan.put(prefix + name, Matrix.of(Piece(parts[0], transpose=True)))
        elif len(parts) == 1 and name.rpartition(".")[2] not in clip.FUSED_NAMES:
            plan.put(prefix + name, Matrix.of(Piece(parts[0])))
        else:
            plan.put(prefix + name, _concatenated(name, parts, clip.open_clip_to_transformers(name)))
    return plan


def _clip_to_diffusers(tensors: list[TensorInfo], prefix: str, open_clip: bool) -> Plan:
    plan = Plan()
    for t in tensors:
        name = t.name[len(prefix):]
        if not open_clip:
            plan.put(name, Matrix.of(Piece(t)))
            continue
        targets = clip.open_clip_to_transformers(name)
        if targets is None:
            if name in clip.NOT_WEIGHTS:
                plan.left.append(t.name)
                continue
            raise CkptError(Code.KEY_MISMATCH, f"{t.name}: not a key of an OpenCLIP text encoder; nothing written")
        if name in clip.TRANSPOSED:
            plan.put(targets[0], Matrix.of(Piece(t, transpose=True)))
        elif len(targets) == 1:
            plan.put(targets[0], Matrix.of(Piece(t)))
        else:
            if not t.shape or t.shape[0] % 3:
                raise CkptError(Code.SHAPE_MISMATCH, f"{t.name}: q, k and v fused, but {t.shape[0] if t.shape else 0} "
                                "rows do not part in three; nothing written")
            width = t.shape[0] // 3
            for i, target in enumerate(targets):
                plan.put(target, Matrix.of(Piece(t, rows=(i * width, (i + 1) * width))))
    plan.config = _config(_clip_config, plan.outputs, open_clip)
    if "num_attention_heads" not in plan.config:
        plan.notes.append(f"a text encoder {plan.config['hidden_size']} wide is none of CLIP-L, OpenCLIP-H or bigG: "
                          "its heads and activation are not in the weights; set them in its config.json")
    return plan


def _by_original_key(tensors: list[TensorInfo], lookup, unknown: str) -> dict[str, dict[int, TensorInfo]]:
    """{original key: {place among its fused parts: tensor}} by `lookup` (name -> (key, place) or None); a name it
    does not know refuses the whole conversion with `unknown` (its "{}" the name)."""
    fused: dict[str, dict[int, TensorInfo]] = {}
    for t in tensors:
        found = lookup(t.name)
        if found is None:
            raise CkptError(Code.KEY_MISMATCH, unknown.format(t.name) + "; nothing written")
        fused.setdefault(found[0], {})[found[1]] = t
    return fused


def _swapped(name: str, t: TensorInfo) -> bool:
    """Whether the tensor is the final modulation's, whose shift and scale halves change places."""
    if name.rpartition(".")[0] not in flux.SWAPPED:
        return False
    if not t.shape or t.shape[0] % 2:
        raise CkptError(Code.SHAPE_MISMATCH, f"{t.name}: the final modulation gives shift and scale, two halves, but "
                        f"it has {t.shape[0] if t.shape else 0} rows; nothing written")
    return True


def _concatenated(name: str, parts: dict[int, TensorInfo], names: tuple[str, ...]) -> Matrix:
    """One fused tensor of its parts' rows in order (q, k, v, ...): every part there, of one dtype (never cast on
    the way) and one trailing shape."""
    if sorted(parts) != list(range(len(names))):
        missing = set(names) - {t.name for t in parts.values()}
        raise CkptError(Code.KEY_MISMATCH, f"{name} fuses {len(names)} tensors, and {', '.join(sorted(missing))} is "
                        "missing; nothing written")
    ordered = [parts[i] for i in range(len(names))]
    if len({t.dtype for t in ordered}) > 1:
        raise CkptError(Code.DTYPE_MISMATCH, f"{name} fuses {', '.join(f'{t.name} ({t.dtype})' for t in ordered)}: "
                        "one tensor cannot hold several dtypes; cast the model to one first (`ckpttool convert "
                        "--dtype`); nothing written")
    if len({tuple(t.shape[1:]) for t in ordered}) > 1:
        raise CkptError(Code.SHAPE_MISMATCH, f"{name}: its parts' shapes {[list(t.shape) for t in ordered]} do not "
                        "stack; nothing written")
    sizes = [t.shape[0] for t in ordered]
    return stacked([(sum(sizes[:i]), 0, Matrix.of(Piece(t))) for i, t in enumerate(ordered)],
                   (sum(sizes), *ordered[0].shape[1:]))


def to_diffusers(tensors: list[TensorInfo], family: str) -> Plan:
    """An original single file's diffusion model under diffusers' keys, with the config.json its weights show; the
    file's other parts (VAE, text encoders) are listed in `left`."""
    plan = Plan()
    if family == "flux.1":
        by_name = {}
        for t in tensors:
            if _unprefixed(t.name) in by_name:
                raise CkptError(Code.KEY_MISMATCH, f"{t.name} and {by_name[_unprefixed(t.name)].name} are the same "
                                "key with and without a prefix: which one counts cannot be told; nothing written")
            by_name[_unprefixed(t.name)] = t
        if "img_in.weight" not in by_name:
            raise CkptError(Code.KEY_MISMATCH, "img_in.weight is missing, so the transformer's width (and where its "
                            "fused q, k, v split) cannot be told; nothing written")
        hidden = by_name["img_in.weight"].shape[0]
        for name, t in by_name.items():
            targets = flux.key_to_diffusers(name)
            if targets is None:
                if name.startswith(("vae.", "text_encoders.", "first_stage_model.")):
                    plan.left.append(t.name)
                    continue
                raise CkptError(Code.KEY_MISMATCH, f"{t.name}: not a key of Flux.1's transformer; nothing written")
            if len(targets) == 1:
                plan.put(targets[0], Matrix.of(Piece(t, swap=_swapped(name, t))))
                continue
            sizes = flux.part_sizes(name.rpartition(".")[0], hidden)
            if sum(sizes) != t.shape[0]:
                raise CkptError(Code.SHAPE_MISMATCH, f"{t.name}: {t.shape[0]} rows, but a Flux.1 transformer "
                                f"{hidden} wide fuses {sum(sizes)} there; nothing written")
            for i, target in enumerate(targets):
                start = sum(sizes[:i])
                plan.put(target, Matrix.of(Piece(t, rows=(start, start + sizes[i]))))
        plan.config = _config(_flux_config, plan.outputs)
        if plan.config.get("axes_dims_rope") is None:
            plan.config.pop("axes_dims_rope")
            plan.notes.append(f"heads {plan.config['attention_head_dim']} wide, not Flux.1's 128: their rotary "
                              "split (axes_dims_rope) is not in the weights; set it in config.json")
        return plan
    for t in tensors:
        if not t.name.startswith(UNET_PREFIX):
            plan.left.append(t.name)
            continue
        module, _, param = t.name[len(UNET_PREFIX):].rpartition(".")
        name = unet.to_diffusers(module, family)
        if name is None:
            raise CkptError(Code.KEY_MISMATCH, f"{t.name}: not a key of {family}'s UNet; nothing written")
        plan.put(f"{name}.{param}", Matrix.of(Piece(t)))
    plan.config = _config(_unet_config, plan.outputs, family)
    settings, note = unet_settings(plan.config, family)
    plan.config.update(settings)
    plan.notes += [note] if note else []
    return plan


def _config(build, *args) -> dict:
    """A config.json from the shapes; a tensor it reads that the file lacks stops the conversion."""
    try:
        return build(*args)
    except (KeyError, IndexError) as e:
        raise CkptError(Code.KEY_MISMATCH, f"{e.args[0] if e.args else 'a tensor'} is missing, so the model's "
                        "config cannot be told from the weights; nothing written") from None


def _unprefixed(name: str) -> str:
    for prefix in FLUX_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _count(outputs: dict, prefix: str) -> int:
    return len({k[len(prefix):].partition(".")[0] for k in outputs if k.startswith(prefix)})


def _flux_config(outputs: dict) -> dict:
    """FluxTransformer2DModel's config from the shapes (transformer_flux.py's arguments)."""
    shape = {k: m.shape for k, m in outputs.items()}
    heads_dim = shape["transformer_blocks.0.attn.norm_q.weight"][0]
    hidden = shape["x_embedder.weight"][0]
    return {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": shape["x_embedder.weight"][1],
            "out_channels": shape["proj_out.weight"][0], "num_layers": _count(outputs, "transformer_blocks."),
            "num_single_layers": _count(outputs, "single_transformer_blocks."), "attention_head_dim": heads_dim,
            "num_attention_heads": hidden // heads_dim,
            "joint_attention_dim": shape["context_embedder.weight"][1],
            "pooled_projection_dim": shape["time_text_embed.text_embedder.linear_1.weight"][1],
            "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in shape,
            "axes_dims_rope": FLUX_ROPE.get(heads_dim)}


def _unet_config(outputs: dict, family: str) -> dict:
    """UNet2DConditionModel's config from the shapes, with the family's settings the weights cannot show."""
    shape = {k: m.shape for k, m in outputs.items()}
    down, up = unet.ATTENTION[family]
    channels = [shape[f"down_blocks.{b}.resnets.0.conv1.weight"][0] for b in range(len(down))]
    per_block = [sum(1 for k in shape if k.startswith(f"down_blocks.{b}.attentions.0.transformer_blocks.")
                     and k.endswith(".attn1.to_q.weight")) or 1 for b in range(len(down))]
    widths = {s[1] for k, s in shape.items() if k.endswith("attn2.to_k.weight")}
    config = {"_class_name": "UNet2DConditionModel", "in_channels": shape["conv_in.weight"][1],
              "out_channels": shape["conv_out.weight"][0], "block_out_channels": channels,
              "layers_per_block": unet.LAYERS, "cross_attention_dim": widths.pop() if len(widths) == 1 else None,
              "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down],
              "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up],
              "transformer_layers_per_block": per_block,
              "use_linear_projection": len(shape.get("mid_block.attentions.0.proj_in.weight", ())) == 2}
    if "add_embedding.linear_1.weight" in shape:
        config.update(addition_embed_type="text_time",
                      projection_class_embeddings_input_dim=shape["add_embedding.linear_1.weight"][1])
    return config


# the text encoders' settings their weights cannot show, by their width (openai/clip-vit-large-patch14; OpenCLIP
# ViT-H-14 and ViT-bigG-14 as the SD2 and SDXL repos' text_encoder/config.json have them); the VAE's latent scaling
# (the repos' vae/config.json)
CLIP_SETTINGS = {768: {"num_attention_heads": 12, "hidden_act": "quick_gelu"},
                 1024: {"num_attention_heads": 16, "hidden_act": "gelu"},
                 1280: {"num_attention_heads": 20, "hidden_act": "gelu"}}
VAE_SCALING = {"sdxl": 0.13025, "sd1": 0.18215, "sd2": 0.18215}
VAE_CHANNELS = [128, 256, 512, 512]


def _clip_config(outputs: dict, with_projection: bool) -> dict:
    shape = {k: m.shape for k, m in outputs.items()}
    vocab, hidden = shape["text_model.embeddings.token_embedding.weight"]
    config = {"architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
              "model_type": "clip_text_model", "hidden_size": hidden, "vocab_size": vocab,
              "max_position_embeddings": shape["text_model.embeddings.position_embedding.weight"][0],
              "intermediate_size": shape["text_model.encoder.layers.0.mlp.fc1.weight"][0],
              "num_hidden_layers": _count(outputs, "text_model.encoder.layers.")}
    if "text_projection.weight" in shape:
        config["projection_dim"] = shape["text_projection.weight"][0]
    config.update(CLIP_SETTINGS.get(hidden, {}))
    return config


def _vae_config(outputs: dict, family: str) -> dict:
    shape = {k: m.shape for k, m in outputs.items()}
    blocks = _count(outputs, "encoder.down_blocks.")
    channels = [shape[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(blocks)]
    config = {"_class_name": "AutoencoderKL", "in_channels": shape["encoder.conv_in.weight"][1],
              "out_channels": shape["decoder.conv_out.weight"][0],
              "latent_channels": shape["post_quant_conv.weight"][0],
              "block_out_channels": channels, "down_block_types": ["DownEncoderBlock2D"] * blocks,
              "up_block_types": ["UpDecoderBlock2D"] * blocks,
              "layers_per_block": _count(outputs, "encoder.down_blocks.0.resnets.")}
    if channels == VAE_CHANNELS:
        config["scaling_factor"] = VAE_SCALING[family]
    return config


def unet_settings(config: dict, family: str) -> tuple[dict, str | None]:
    """The family's settings its weights cannot show, where the widths are the family's own; else a note to set them
    by hand."""
    settings = SETTINGS[family]
    if config["block_out_channels"] == CHANNELS[family]:
        return settings, ("sample_size (64 for SD2 base, 96 for the 768-v models) and upcast_attention are not in "
                          "the weights; set them in config.json") if family == "sd2" else None
    return {}, (f"block widths {config['block_out_channels']} are not {family}'s {CHANNELS[family]}: "
                f"{', '.join(settings)} are not in the weights; set them in config.json")
