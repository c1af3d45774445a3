"""What a weights file is, from keys and shapes alone (issue 35's first part): a LoRA, its key convention, rank and
alpha, on files peft and diffusers wrote themselves and on kohya's and the original layout's key names."""

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import cli


def _identity(path):
    result, report = cli("inspect", "--json", str(path))
    assert result.exit_code == 0, result.output
    return report["identity"]


def test_a_peft_adapter_is_a_lora_in_peft_keys(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    identity = _identity(tmp_path / "adapter" / "adapter_model.safetensors")
    assert identity == {"kind": "lora", "family": None, "variant": None, "convention": "peft", "rank": 4,
                        "alpha": None, "modules": 2}


def test_a_diffusers_lora_is_a_lora_in_diffusers_keys_with_its_alpha(tmp_path):
    """StableDiffusionPipeline.save_lora_weights of a tiny UNet's peft LoRA: `unet.` keys, lora_A/lora_B, and the
    adapter metadata (lora_alpha) in the safetensors header."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=8, attention_head_dim=4)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    unet.add_adapter(config)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(unet),
                                              unet_lora_adapter_metadata=config.to_dict())
    identity = _identity(tmp_path / "pytorch_lora_weights.safetensors")
    assert identity["kind"] == "lora" and identity["convention"] == "diffusers" and identity["rank"] == 8
    assert identity["alpha"] == 16.0 and identity["family"] is None


def test_kohya_and_original_keys_with_per_module_alpha(tmp_path):
    """kohya's LoRANetwork names (lora_unet_..., lora_te1_...) with .lora_down/.lora_up and a bf16 .alpha per module;
    the original layout's `diffusion_model.` keys; ranks that differ are listed."""
    kohya = {}
    for name, rank in (("lora_unet_input_blocks_1_1_proj_in", 4), ("lora_te1_text_model_encoder_layers_0_mlp_fc1", 8)):
        kohya[f"{name}.lora_down.weight"] = torch.zeros(rank, 16)
        kohya[f"{name}.lora_up.weight"] = torch.zeros(16, rank)
        kohya[f"{name}.alpha"] = torch.tensor(2.0, dtype=torch.bfloat16)
    save_file(kohya, tmp_path / "kohya.safetensors")
    assert _identity(tmp_path / "kohya.safetensors") == {"kind": "lora", "family": None, "variant": None,
                                                         "convention": "kohya", "rank": [4, 8], "alpha": 2.0,
                                                         "modules": 2}
    original = {"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(16, 32),
                "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(96, 16)}
    save_file(original, tmp_path / "original.safetensors")
    identity = _identity(tmp_path / "original.safetensors")
    assert identity["convention"] == "original" and identity["rank"] == 16 and identity["family"] == "flux.1"
    result, _ = cli("inspect", str(tmp_path / "kohya.safetensors"))
    assert "lora (kohya convention; ranks 4, 8; alpha 2; 2 modules; family not told)" in result.output


def test_a_model_no_signature_names_is_not_told(tmp_path):
    save_file({"layer.weight": torch.zeros(4, 4), "layer.lora_bias": torch.zeros(4)}, tmp_path / "model.safetensors")
    assert _identity(tmp_path / "model.safetensors") is None


# (keys and shapes of the original single-file layout, what identity says, what diffusers 0.42.1's own
# infer_diffusers_model_type says of the same keys and shapes)
DM = "model.diffusion_model."
SINGLE_FILES = [
    ({DM + "output_blocks.11.0.skip_connection.weight": (320, 640), DM + "input_blocks.0.0.weight": (320, 4, 3, 3),
      "first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3)}, ("checkpoint", "sd1", None), "v1"),
    ({DM + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
      DM + "input_blocks.0.0.weight": (320, 4, 3, 3)}, ("diffusion_model", "sd2", None), "v2"),
    ({DM + "input_blocks.0.0.weight": (320, 9, 3, 3), DM + "output_blocks.11.0.skip_connection.weight": (320, 640),
      "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768)},
     ("checkpoint", "sd1", "inpaint"), "inpainting"),
    ({"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
      DM + "input_blocks.0.0.weight": (320, 4, 3, 3)}, ("checkpoint", "sdxl", "base"), "xl_base"),
    ({"conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
      DM + "input_blocks.0.0.weight": (384, 4, 3, 3)}, ("checkpoint", "sdxl", "refiner"), "xl_refiner"),
    ({"double_blocks.0.img_attn.norm.key_norm.scale": (128,), "guidance_in.in_layer.bias": (3072,),
      "img_in.weight": (3072, 64)}, ("diffusion_model", "flux.1", "dev"), "flux-dev"),
    ({"double_blocks.0.img_attn.norm.key_norm.scale": (128,), "guidance_in.in_layer.bias": (3072,),
      "img_in.weight": (3072, 384)}, ("diffusion_model", "flux.1", "fill"), "flux-fill"),
    ({DM + "double_blocks.0.img_attn.norm.key_norm.scale": (128,), DM + "img_in.weight": (3072, 64)},
     ("diffusion_model", "flux.1", "schnell"), "flux-schnell"),
    ({"joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,), "pos_embed": (1, 36864, 1536)},
     ("diffusion_model", "sd3", "medium"), "sd3"),
    ({"joint_blocks.37.x_block.mlp.fc1.weight": (9216, 2432)}, ("diffusion_model", "sd3", "3.5-large"), "sd35_large"),
    ({"head.modulation": (1, 2, 1536), "patch_embedding.weight": (1536, 16, 1, 2, 2)},
     ("diffusion_model", "wan", None), "wan-t2v-1.3B"),
]


@pytest.mark.parametrize("keys, said, diffusers_says", SINGLE_FILES, ids=[s[2] for s in SINGLE_FILES])
def test_single_file_family_and_variant_agree_with_diffusers(tmp_path, keys, said, diffusers_says):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    assert infer_diffusers_model_type({k: torch.zeros(shape) for k, shape in keys.items()}) == diffusers_says
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, tmp_path / "model.safetensors")
    identity = _identity(tmp_path / "model.safetensors")
    assert (identity["kind"], identity["family"], identity["variant"]) == said
    assert identity["convention"] == "original"


def test_diffusers_models_built_by_diffusers_classes(tmp_path):
    """A shrunk FluxTransformer2DModel (with guidance: dev; a 384-channel input: fill; without: schnell) and a shrunk
    UNet2DConditionModel whose cross-attention takes SD1's 768-wide text (a 9-channel input: inpaint)."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    for guidance, channels, variant in ((True, 64, "dev"), (True, 384, "fill"), (False, 64, "schnell")):
        model = FluxTransformer2DModel(in_channels=channels, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                       num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                       guidance_embeds=guidance, axes_dims_rope=(2, 2, 4))
        model.save_pretrained(tmp_path / variant)
        identity = _identity(tmp_path / variant / "diffusion_pytorch_model.safetensors")
        assert identity == {"kind": "diffusion_model", "family": "flux.1", "variant": variant,
                            "convention": "diffusers"}, variant
    for channels, variant in ((4, None), (9, "inpaint")):
        unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
                                    in_channels=channels, out_channels=4, cross_attention_dim=768, norm_num_groups=8,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=4,
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        unet.save_pretrained(tmp_path / f"unet{channels}")
        identity = _identity(tmp_path / f"unet{channels}" / "diffusion_pytorch_model.safetensors")
        assert identity == {"kind": "diffusion_model", "family": "sd1", "variant": variant, "convention": "diffusers"}


LM_CONFIG = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1)


@pytest.mark.parametrize("config_class,model_class,options,expected", [
    # the Llama layout is told as a layout; the family only with Llama 3's vocabulary
    ("LlamaConfig", "LlamaForCausalLM", {}, (None, "llama")),
    ("LlamaConfig", "LlamaForCausalLM", {"vocab_size": 128256}, ("llama", "llama")),
    ("MistralConfig", "MistralForCausalLM", {}, (None, "llama")),
    ("GemmaConfig", "GemmaForCausalLM", {}, (None, "llama")),
    ("Qwen2Config", "Qwen2ForCausalLM", {}, ("qwen2", "llama")),
    ("Qwen3Config", "Qwen3ForCausalLM", {}, ("qwen3", "llama")),
    ("StableLmConfig", "StableLmForCausalLM", {"use_qkv_bias": True}, None),  # LayerNorm biases: not Qwen2
    ("Gemma2Config", "Gemma2ForCausalLM", {}, None),  # extra feed-forward norms: not the Llama layout
    ("GPT2Config", "GPT2LMHeadModel", {}, ("gpt2", None)),
    ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", {}, None),  # multi-query c_attn: not GPT-2's
])
def test_language_models_saved_by_transformers(tmp_path, config_class, model_class, options, expected):
    import transformers

    base = (dict(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=32) if model_class.startswith("GPT")
            else dict(LM_CONFIG, head_dim=8))
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**{**base, **options}))
    model.save_pretrained(tmp_path / "model")
    identity = _identity(tmp_path / "model" / "model.safetensors")
    if expected is None:
        assert identity is None
    else:
        family, layout = expected
        assert identity == {"kind": "model", "family": family, "variant": None, "convention": "transformers",
                            **({"layout": layout} if layout else {})}


def _lora(path, modules: dict):
    """A kohya-convention LoRA with the given module -> (out, in) shapes."""
    sd = {}
    for name, (out, inp) in modules.items():
        sd[f"{name}.lora_down.weight"] = torch.zeros(2, inp)
        sd[f"{name}.lora_up.weight"] = torch.zeros(out, 2)
    save_file(sd, str(path))
    return path


@pytest.mark.parametrize("width,family", [(768, "sd1"), (1024, "sd2"), (2048, "sdxl"), (512, None)])
def test_a_unet_loras_family_by_its_cross_attention_width(tmp_path, width, family):
    base = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2"
    path = _lora(tmp_path / "l.safetensors", {f"{base}_to_k": (320, width), f"{base}_to_q": (320, 320)})
    assert _identity(path)["family"] == family


def test_a_flux_loras_variant_by_its_image_input(tmp_path):
    fill = _lora(tmp_path / "fill.safetensors", {"lora_unet_img_in": (3072, 384),
                                                 "lora_unet_double_blocks_0_img_attn_proj": (3072, 3072)})
    assert _identity(fill)["variant"] == "fill"
    dev = _lora(tmp_path / "dev.safetensors", {"lora_unet_img_in": (3072, 64),
                                               "lora_unet_double_blocks_0_img_attn_proj": (3072, 3072)})
    assert _identity(dev)["family"] == "flux.1" and _identity(dev)["variant"] is None  # dev and schnell alike


def test_diff_says_a_fill_lora_is_not_for_a_dev_model(tmp_path):
    fill = _lora(tmp_path / "fill.safetensors", {"lora_unet_img_in": (3072, 384),
                                                 "lora_unet_double_blocks_0_img_attn_proj": (3072, 3072)})
    dev = tmp_path / "dev.safetensors"
    save_file({"img_in.weight": torch.zeros(3072, 64), "guidance_in.in_layer.bias": torch.zeros(3072),
               "double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(128)}, str(dev))
    result, report = cli("diff", "--json", str(fill), str(dev))
    assert result.exit_code == 1
    assert report["identity"]["a"]["variant"] == "fill" and report["identity"]["b"]["variant"] == "dev"
    assert report["apart"] == ("A is a flux.1 fill LoRA (kohya), B a flux.1 dev diffusion model (original): made for "
                               "different variants of flux.1 (fill, dev)")
    assert report["fix"] is None  # no key remap makes one the other
    text = cli("diff", str(fill), str(dev))[0].output
    assert "Not for each other: A is a flux.1 fill LoRA" in text


def test_diff_of_loras_for_different_families_and_of_like_files(tmp_path):
    base = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    sd1 = _lora(tmp_path / "sd1.safetensors", {base: (320, 768)})
    sdxl = _lora(tmp_path / "sdxl.safetensors", {base: (320, 2048)})
    report = cli("diff", "--json", str(sd1), str(sdxl))[1]
    assert report["apart"].endswith("they are for different model families")
    same = cli("diff", "--json", str(sd1), str(sd1))[1]
    assert same["same"] and same["apart"] is None and same["identity"]["a"]["family"] == "sd1"


@pytest.mark.parametrize("width,family", [(768, "sd1"), (2048, "sdxl"), (1280, None)])
def test_an_ldm_unet_alone_by_its_cross_attention_width(tmp_path, width, family):
    base = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2"
    path = tmp_path / "unet.safetensors"
    save_file({f"{base}.to_k.weight": torch.zeros(640, width), f"{base}.to_q.weight": torch.zeros(640, 640)}, path)
    identity = _identity(path)
    assert (identity or {}).get("family") == family
    if family:
        assert identity["kind"] == "diffusion_model" and identity["convention"] == "original"


def test_flux_kin_are_not_told_flux1(tmp_path):
    """Chroma (distilled guidance), Flux.2 (shared stream modulations, a gated MLP in linear1) and ControlNets are
    built like the model they follow, and are not it."""
    from diffusers import ChromaTransformer2DModel, ControlNetModel, FluxControlNetModel

    tiny = dict(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
    for name, model in (("chroma", ChromaTransformer2DModel(**tiny, approximator_num_channels=8,
                                                            approximator_hidden_dim=16, approximator_layers=1)),
                        ("flux_controlnet", FluxControlNetModel(**tiny, pooled_projection_dim=32)),
                        ("sd_controlnet", ControlNetModel(block_out_channels=(32, 64), layers_per_block=1,
                                                          cross_attention_dim=768, norm_num_groups=32,
                                                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                                          attention_head_dim=4))):
        model.save_pretrained(tmp_path / name)
        assert _identity(tmp_path / name) is None, name
    single = tmp_path / "flux2.safetensors"
    save_file({"double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(8),
               "single_stream_modulation.lin.weight": torch.zeros(8, 8)}, single)
    assert _identity(single)["family"] == "flux.2"
    lora = _lora(tmp_path / "flux2_lora.safetensors", {"lora_unet_single_blocks_0_linear1": (9 * 64, 64)})
    assert _identity(lora)["family"] is None
    lora1 = _lora(tmp_path / "flux1_lora.safetensors", {"lora_unet_single_blocks_0_linear1": (7 * 64, 64)})
    assert _identity(lora1)["family"] == "flux.1"


def test_diff_of_one_lora_in_two_conventions_offers_remap_to(tmp_path):
    kohya = _lora(tmp_path / "k.safetensors", {"lora_unet_double_blocks_0_img_attn_proj": (3072, 3072)})
    diffusers = tmp_path / "d.safetensors"
    assert cli("remap", str(kohya), str(diffusers), "--to", "diffusers")[0].exit_code == 0
    report = cli("diff", "--json", str(kohya), str(diffusers))[1]
    assert report["fix"] == f"ckpttool remap {kohya} k-diffusers.safetensors --to diffusers"


def test_a_vae_or_text_encoder_saved_alone(tmp_path):
    """A pipeline's other parts: kind told, family not (SD's, SDXL's and Flux's VAEs differ in weights only)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32)
    vae.save_pretrained(tmp_path / "vae")
    assert _identity(tmp_path / "vae") == {"kind": "vae", "family": None, "variant": None, "convention": "diffusers"}
    ldm = tmp_path / "ae.safetensors"
    save_file({"encoder.down.0.block.0.conv1.weight": torch.zeros(2, 2, 3, 3),
               "decoder.up.0.block.0.conv1.weight": torch.zeros(2, 2, 3, 3)}, ldm)
    assert _identity(ldm)["kind"] == "vae" and _identity(ldm)["convention"] == "original"
    CLIPTextModel(CLIPTextConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
                                 vocab_size=100)).save_pretrained(tmp_path / "clip")
    T5EncoderModel(T5Config(d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, vocab_size=100)).save_pretrained(
        tmp_path / "t5")
    for name in ("clip", "t5"):
        assert _identity(tmp_path / name / "model.safetensors") == {"kind": "text_encoder", "family": None,
                                                                     "variant": None, "convention": "transformers"}
