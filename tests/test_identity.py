"""What a weights file is, from keys and shapes alone (issue 35's first part): a LoRA, its key convention, rank and
alpha, on files peft and diffusers wrote themselves and on kohya's and the original layout's key names."""

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
    assert identity == {"kind": "lora", "family": None, "convention": "peft", "rank": 4, "alpha": None,
                        "modules": 2}


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
    assert _identity(tmp_path / "kohya.safetensors") == {"kind": "lora", "family": None, "convention": "kohya",
                                                         "rank": [4, 8], "alpha": 2.0, "modules": 2}
    original = {"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(16, 32),
                "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(96, 16)}
    save_file(original, tmp_path / "original.safetensors")
    identity = _identity(tmp_path / "original.safetensors")
    assert identity["convention"] == "original" and identity["rank"] == 16
    result, _ = cli("inspect", str(tmp_path / "kohya.safetensors"))
    assert "lora (kohya convention; ranks 4, 8; alpha 2; 2 modules; family not told)" in result.output


def test_a_model_is_no_lora(tmp_path):
    save_file({"layer.weight": torch.zeros(4, 4), "layer.lora_bias": torch.zeros(4)}, tmp_path / "model.safetensors")
    assert _identity(tmp_path / "model.safetensors") is None
