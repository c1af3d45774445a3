"""`remap --to diffusers|kohya|original`: LoRA files moved between key conventions, with diffusers' own loaders as
the oracle: `lora_state_dict` of the converted file gives every module the same update (up @ down x alpha / rank)
as the source does."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ckpttool.cli import main

pytest.importorskip("diffusers")
pytest.importorskip("peft")

H = 3072  # Flux.1's width: diffusers' kohya conversion cuts linear1 at 3072 x 3 + 12288 rows
FLUX = {"double_blocks_0_img_attn_qkv": (3 * H, H), "double_blocks_0_img_attn_proj": (H, H),
        "double_blocks_0_img_mlp_0": (4 * H, H), "double_blocks_0_img_mlp_2": (H, 4 * H),
        "double_blocks_0_img_mod_lin": (6 * H, H), "double_blocks_0_txt_attn_qkv": (3 * H, H),
        "double_blocks_0_txt_attn_proj": (H, H), "double_blocks_0_txt_mod_lin": (6 * H, H),
        "single_blocks_0_linear1": (7 * H, H), "single_blocks_0_linear2": (H, 5 * H),
        "single_blocks_0_modulation_lin": (3 * H, H), "img_in": (H, 64), "guidance_in_in_layer": (H, 256),
        "time_in_out_layer": (H, H)}
# diffusers drops the alpha of Flux's final layer (lora_conversion_utils.py "TODO: alphas"), so for the oracle these
# keep alpha = rank; test_flux_final_layer_alpha_is_kept checks them against the arithmetic instead
FINAL = {"final_layer_linear": (64, H), "final_layer_adaLN_modulation_1": (2 * H, H)}
TEXT = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.output
    return result


def kohya_flux(path, rank=3, alpha=2.0, split_qkv=False, final_alpha=None):
    """A kohya Flux.1 LoRA as sd-scripts' lora_flux.py names it; `split_qkv`: the fused modules' up matrices
    block-diagonal, as its split_qkv option trains them."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, (out, inp) in {**FLUX, **FINAL}.items():
        down = torch.randn(rank, inp, generator=g) * 0.1
        up = torch.randn(out, rank, generator=g) * 0.1
        parts = 4 if name.endswith("linear1") else 3 if name.endswith("qkv") else 1
        if split_qkv and parts > 1:
            down = torch.randn(rank * parts, inp, generator=g) * 0.1
            sizes = [H] * 3 + [4 * H] if parts == 4 else [H] * 3
            up = torch.block_diag(*[torch.randn(size, rank, generator=g) * 0.1 for size in sizes])
        sd[f"lora_unet_{name}.lora_down.weight"] = down
        sd[f"lora_unet_{name}.lora_up.weight"] = up
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(
            float(down.shape[0] if final_alpha is None else final_alpha) if name in FINAL else alpha * (down.shape[0]
                                                                                                          // rank))
    sd[f"{TEXT}.lora_down.weight"] = torch.randn(rank, 768, generator=g)
    sd[f"{TEXT}.lora_up.weight"] = torch.randn(768, rank, generator=g)
    sd[f"{TEXT}.alpha"] = torch.tensor(1.0)
    save_file(sd, str(path))
    return path


def flux_updates(path) -> dict:
    """Every module's update as diffusers' FluxPipeline.lora_state_dict gives the file, by diffusers' module name."""
    from diffusers import FluxPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd, alphas = FluxPipeline.lora_state_dict(str(path), return_alphas=True)
    return updates(sd, alphas or {})


DOWN_KEY = re.compile(r"(.+?)(?:\.lora_A\.weight|\.lora\.down\.weight|_lora\.down\.weight|"
                      r"\.lora_linear_layer\.down\.weight)")
# the older attention-processor names diffusers' kohya conversion still gives, as the module names they stand for
OLD_NAMES = ((r"\.processor\.", "."), (r"self_attn\.to_(q|k|v)$", r"self_attn.\1_proj"),
             (r"self_attn\.to_out$", "self_attn.out_proj"), (r"\.to_out$", ".to_out.0"))


def module_name(name: str) -> str:
    for old, new in OLD_NAMES:
        name = re.sub(old, new, name)
    return name if name.startswith(("unet.", "text_encoder", "transformer.")) else "transformer." + name


def updates(sd: dict, alphas: dict) -> dict:
    """Each module's update (up @ down x alpha / rank) as its response to fixed random probes: the same linear map
    gives the same response, and a 21504 x 3072 update is never formed."""
    out = {}
    for key, down in sd.items():
        if not (m := DOWN_KEY.fullmatch(key)):
            continue
        up = sd[key.replace("lora_A", "lora_B").replace("down.weight", "up.weight")]
        alpha = alphas.get(m.group(1) + ".alpha", alphas.get(key + ".alpha"))  # (SD's kohya alphas: the latter)
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        down, up = down.flatten(1).double(), up.flatten(1).double()
        probes = torch.randn(down.shape[1], 8, generator=torch.Generator().manual_seed(down.shape[1]),
                             dtype=torch.float64)
        out[module_name(m.group(1))] = up @ (down @ probes) * scale
    return out


def assert_same_updates(a: dict, b: dict):
    assert a and set(a) == set(b), sorted(set(a) ^ set(b))[:6]
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6 * float(a[name].abs().max()), msg=name)


@pytest.fixture(scope="module")
def flux_kohya(tmp_path_factory):
    return kohya_flux(tmp_path_factory.mktemp("flux") / "kohya.safetensors")


def test_flux_kohya_to_diffusers_gives_diffusers_own_updates(flux_kohya, tmp_path):
    out = tmp_path / "diffusers.safetensors"
    result = run("remap", flux_kohya, out, "--to", "diffusers", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["family"] == "flux.1" and doc["convention"] == "diffusers" and doc["modules"] == 24
    assert_same_updates(flux_updates(flux_kohya), flux_updates(out))
    keys = load_file(out)
    # q, k, v and the MLP input of the fused modules, each with the shared down matrix
    assert keys["transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight"].shape == (4 * H, 3)
    assert torch.equal(keys["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"],
                       keys["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"])


def test_flux_split_qkv_cuts_the_down_matrix(tmp_path):
    src = kohya_flux(tmp_path / "split.safetensors", rank=2, split_qkv=True)
    out = tmp_path / "diffusers.safetensors"
    assert run("remap", src, out, "--to", "diffusers").exit_code == 0
    keys = load_file(out)
    assert keys["transformer.transformer_blocks.0.attn.add_k_proj.lora_A.weight"].shape == (2, H)
    assert keys["transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight"].shape == (4 * H, 2)
    assert_same_updates(flux_updates(src), flux_updates(out))
    back = tmp_path / "back.safetensors"
    assert run("remap", out, back, "--to", "kohya").exit_code == 0
    assert load_file(back)["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape == (8, H)  # ranks summed
    assert_same_updates(flux_updates(src), flux_updates(back))


def test_flux_kohya_round_trips_bit_for_bit(flux_kohya, tmp_path):
    again = tmp_path / "again.safetensors"
    assert run("remap", flux_kohya, again, "--to", "kohya").exit_code == 0
    a, b = load_file(flux_kohya), load_file(again)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_flux_diffusers_to_kohya_and_original(flux_kohya, tmp_path):
    dif = tmp_path / "diffusers.safetensors"
    run("remap", flux_kohya, dif, "--to", "diffusers")
    kohya = tmp_path / "kohya.safetensors"
    assert run("remap", dif, kohya, "--to", "kohya").exit_code == 0
    assert_same_updates(flux_updates(flux_kohya), flux_updates(kohya))
    # the original layout holds the transformer only: the text encoder's module is refused, nothing written
    original = tmp_path / "original.safetensors"
    refused = run("remap", dif, original, "--to", "original")
    assert refused.exit_code == 1 and "text encoder" in refused.output and not original.exists()
    only = tmp_path / "transformer_only.safetensors"
    save_file({k: v for k, v in load_file(dif).items() if k.startswith("transformer.")}, str(only))
    assert run("remap", only, original, "--to", "original").exit_code == 0
    keys = load_file(original)
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in keys
    assert run("inspect", original, "--json").output.count('"convention": "original"') == 1
    back = tmp_path / "back.safetensors"
    assert run("remap", original, back, "--to", "kohya").exit_code == 0
    expected = {k: v for k, v in flux_updates(flux_kohya).items() if k.startswith("transformer.")}
    assert_same_updates(expected, flux_updates(back))


def test_flux_final_layer_alpha_is_kept(tmp_path):
    """diffusers' own kohya conversion drops the final layer's alpha; ours keeps it, and swaps the modulation's
    shift and scale halves (BFL's order against diffusers' AdaLayerNormContinuous)."""
    src = kohya_flux(tmp_path / "k.safetensors", rank=4, final_alpha=1.0)
    out = tmp_path / "d.safetensors"
    assert run("remap", src, out, "--to", "diffusers").exit_code == 0
    k, d = load_file(src), load_file(out)
    base = "lora_unet_final_layer_adaLN_modulation_1"
    expected = k[f"{base}.lora_up.weight"] @ k[f"{base}.lora_down.weight"] * (1.0 / 4)
    expected = torch.cat([expected[H:], expected[:H]])
    got = d["transformer.norm_out.linear.lora_B.weight"] @ d["transformer.norm_out.linear.lora_A.weight"]
    torch.testing.assert_close(got, expected)


def test_flux_parts_with_different_alphas_fuse_exactly(tmp_path):
    """A diffusers Flux LoRA whose q, k and v have their own alphas (diffusers reads `.alpha` keys of such files as
    network alphas) fuses into one qkv with the scales folded into the up blocks."""
    g = torch.Generator().manual_seed(1)
    sd = {}
    for i, (part, alpha) in enumerate((("to_q", 1.0), ("to_k", 4.0), ("to_v", 2.0))):
        base = f"transformer.transformer_blocks.0.attn.{part}"
        sd[f"{base}.lora_A.weight"] = torch.randn(2 + i, H, generator=g)
        sd[f"{base}.lora_B.weight"] = torch.randn(H, 2 + i, generator=g)
        sd[f"{base}.alpha"] = torch.tensor(alpha)
    src = tmp_path / "d.safetensors"
    save_file(sd, str(src))
    out = tmp_path / "k.safetensors"
    assert run("remap", src, out, "--to", "kohya", "--family", "flux.1").exit_code == 0
    assert load_file(out)["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (9, H)
    assert_same_updates(flux_updates(src), flux_updates(out))


def test_refusals(flux_kohya, tmp_path):
    weights = tmp_path / "model.safetensors"
    save_file({"a.weight": torch.zeros(2, 2)}, str(weights))
    result = run("remap", weights, tmp_path / "o.safetensors", "--to", "kohya")
    assert result.exit_code == 2 and "not a LoRA" in result.output
    dora = tmp_path / "dora.safetensors"
    save_file({**load_file(flux_kohya), "lora_unet_img_in.dora_scale": torch.ones(1, 64)}, str(dora))
    result = run("remap", dora, tmp_path / "o.safetensors", "--to", "diffusers")
    assert result.exit_code == 1 and "dora_scale" in result.output and not (tmp_path / "o.safetensors").exists()
    result = run("remap", flux_kohya, tmp_path / "o.safetensors", "--to", "kohya", "--strip-prefix", "x")
    assert result.exit_code == 2 and "of their own" in result.output
    unknown = tmp_path / "unknown.safetensors"
    save_file({"transformer.blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 8),
               "transformer.blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 2)}, str(unknown))
    result = run("remap", unknown, tmp_path / "o.safetensors", "--to", "kohya")
    assert result.exit_code == 2 and "--family" in result.output
    result = run("remap", unknown, tmp_path / "o.safetensors", "--to", "kohya", "--family", "flux.1")
    assert result.exit_code == 1 and "not a module of Flux.1" in result.output


# files kohya's own code wrote (tests/data/kohya_lora, fixtures/kohya_samples.py: sd-scripts networks/lora.py and
# lora_flux.py on shrunk models)
KOHYA = __import__("pathlib").Path(__file__).parent / "data" / "kohya_lora"


def sd_updates(path, xl=False) -> dict:
    from types import SimpleNamespace

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    extra = {"unet_config": SimpleNamespace(layers_per_block=2)} if xl else {}  # SDXL's UNet config maps SGM blocks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd, alphas = cls.lora_state_dict(str(path), **extra)
    return updates(sd, alphas or {})


@pytest.mark.parametrize("name,xl", [("sd1", False), ("sdxl", True)])
def test_kohya_written_sd_loras_convert_both_ways(name, xl, tmp_path):
    """sd-scripts' SD1 LoRA (diffusers' UNet names, 3x3 conv modules too) and SDXL LoRA (SGM names, two text
    encoders): diffusers reads the converted file with every module's update as it reads kohya's, and back."""
    src = KOHYA / f"{name}.safetensors"
    dif, back = tmp_path / "diffusers.safetensors", tmp_path / "kohya.safetensors"
    assert run("remap", src, dif, "--to", "diffusers").exit_code == 0
    expected = sd_updates(src, xl)
    assert_same_updates(expected, sd_updates(dif, xl))
    assert run("remap", dif, back, "--to", "kohya", "--family", "sdxl" if xl else "sd1").exit_code == 0
    assert set(load_file(back)) == set(load_file(src))  # kohya's own names again, every .alpha included
    assert_same_updates(expected, sd_updates(back, xl))


def test_sdxl_unet_lora_through_the_original_layout(tmp_path):
    """The original layout names the UNet as the SGM single file does (`diffusion_model.input_blocks.4.1...`)."""
    unet_only = tmp_path / "unet.safetensors"
    save_file({k: v for k, v in load_file(KOHYA / "sdxl.safetensors").items() if k.startswith("lora_unet_")},
              str(unet_only))
    original, back = tmp_path / "original.safetensors", tmp_path / "kohya.safetensors"
    assert run("remap", unet_only, original, "--to", "original").exit_code == 0
    keys = load_file(original)
    assert "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert run("remap", original, back, "--to", "kohya", "--family", "sdxl").exit_code == 0
    assert_same_updates(sd_updates(unet_only, True), sd_updates(back, True))


def flux_fused_updates(sd: dict, prefix: str, down: str, up: str) -> dict:
    """Each module's update up @ down x alpha / rank (on probes), with the modules' own names."""
    out = {}
    for key in sd:
        if key.startswith(prefix) and key.endswith(down):
            base = key[:-len(down)]
            a, b = sd[key].double(), sd[base + up].double()
            scale = float(sd[base + ".alpha"]) / a.shape[0] if base + ".alpha" in sd else 1.0
            probes = torch.randn(a.shape[1], 8, generator=torch.Generator().manual_seed(a.shape[1]),
                                 dtype=torch.float64)
            out[base.removeprefix(prefix)] = b @ (a @ probes) * scale
    return out


@pytest.mark.parametrize("name", ["flux", "flux_split_qkv"])
def test_kohya_written_flux_loras(name, tmp_path):
    """sd-scripts' Flux LoRAs on a shrunk Flux (diffusers' own kohya reader cuts linear1 at full Flux.1 widths, so
    the arithmetic is the oracle here): each diffusers module's update is its rows of the fused module's update; a
    split_qkv file's block-diagonal up gives each part its own rank-4 down; kohya -> diffusers -> kohya keeps every
    update and every key."""
    src = KOHYA / f"{name}.safetensors"
    dif, back = tmp_path / "diffusers.safetensors", tmp_path / "kohya.safetensors"
    assert run("remap", src, dif, "--to", "diffusers").exit_code == 0
    kohya, converted = load_file(src), load_file(dif)
    fused = flux_fused_updates(kohya, "lora_unet_", ".lora_down.weight", ".lora_up.weight")
    parts = flux_fused_updates(converted, "transformer.", ".lora_A.weight", ".lora_B.weight")
    hidden = kohya["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape[1]
    torch.testing.assert_close(torch.cat([parts[f"single_transformer_blocks.0.{p}"] for p in
                                          ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]),
                               fused["single_blocks_0_linear1"])
    torch.testing.assert_close(torch.cat([parts[f"transformer_blocks.0.attn.{p}"] for p in
                                          ("add_q_proj", "add_k_proj", "add_v_proj")]),
                               fused["double_blocks_0_txt_attn_qkv"])
    torch.testing.assert_close(parts["transformer_blocks.0.ff.net.2"], fused["double_blocks_0_img_mlp_2"])
    rank = converted["transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight"].shape
    assert rank == (4, hidden)  # the part's own rank: shared (flux) or its block of the split (flux_split_qkv)
    assert run("remap", dif, back, "--to", "kohya").exit_code == 0
    again = load_file(back)
    assert set(again) == set(kohya)
    assert again["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape == \
        kohya["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape
    back_updates = flux_fused_updates(again, "lora_unet_", ".lora_down.weight", ".lora_up.weight")
    for module, update in fused.items():
        torch.testing.assert_close(back_updates[module], update, msg=module)


# the module tables themselves, against diffusers' own single-file conversion of every weight of the real models
SD1_UNET = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, layers_per_block=2,
                attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL_UNET = dict(block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, use_linear_projection=True)


@pytest.mark.parametrize("family,config", [("sd1", SD1_UNET), ("sdxl", SDXL_UNET)])
def test_unet_names_match_diffusers_single_file_conversion(family, config):
    """Every weight of SD1.5's and SDXL's UNet (the repos' unet/config.json, built on the meta device): named the LDM
    way by conventions/unet.py, diffusers' convert_ldm_unet_checkpoint puts it back at the same diffusers name."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from ckpttool.conventions import unet

    with torch.device("meta"):
        model = UNet2DConditionModel(**config)
    names = list(model.state_dict())
    checkpoint = {}
    for i, name in enumerate(names):
        module, _, param = name.rpartition(".")
        ldm = unet.to_original(module, family)
        assert ldm is not None and unet.to_diffusers(ldm, family) == module, name
        checkpoint[f"model.diffusion_model.{ldm}.{param}"] = torch.tensor(i)
    converted = convert_ldm_unet_checkpoint(checkpoint, dict(model.config))
    assert set(converted) == set(names)
    assert all(int(converted[name]) == i for i, name in enumerate(names))


def test_sd1_lora_loads_into_a_unet_the_same(tmp_path):
    """diffusers' load_lora_into_unet (the UNet step of load_lora_weights) puts the same delta on every LoRA layer of
    the UNet sd-scripts' sample was made on, from kohya's file and from the converted one."""
    from diffusers import StableDiffusionPipeline
    from peft.tuners.lora import LoraLayer

    from fixtures.kohya_samples import tiny_sd1_unet

    src, dif = KOHYA / "sd1.safetensors", tmp_path / "diffusers.safetensors"
    assert run("remap", src, dif, "--to", "diffusers").exit_code == 0
    model = tiny_sd1_unet()
    for adapter, path in (("kohya", src), ("converted", dif)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sd, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
            StableDiffusionPipeline.load_lora_into_unet({k: v for k, v in sd.items() if k.startswith("unet.")},
                                                        alphas, model, adapter_name=adapter)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 79
    with torch.no_grad():
        for layer in layers:
            torch.testing.assert_close(layer.get_delta_weight("converted"), layer.get_delta_weight("kohya"))


def test_comfy_convention_both_ways(flux_kohya, tmp_path):
    """ComfyUI's own LoraSave names: the model's keys under `diffusion_model.` with kohya's lora_down / lora_up (and
    `.alpha`, which ComfyUI's loader reads)."""
    only = tmp_path / "transformer_only.safetensors"
    save_file({k: v for k, v in load_file(flux_kohya).items() if k.startswith("lora_unet_")}, str(only))
    comfy, back = tmp_path / "comfy.safetensors", tmp_path / "diffusers.safetensors"
    assert run("remap", only, comfy, "--to", "comfy").exit_code == 0
    keys = load_file(comfy)
    assert "diffusion_model.single_blocks.0.linear1.lora_down.weight" in keys
    assert float(keys["diffusion_model.single_blocks.0.linear1.alpha"]) == 2.0
    assert json.loads(run("inspect", "--json", comfy).output)["identity"]["convention"] == "comfy"
    assert run("remap", comfy, back, "--to", "diffusers").exit_code == 0
    assert_same_updates(flux_updates(only), flux_updates(back))


# the attack pass's findings, each provoked


def _kohya(path, modules: dict, alphas: dict | None = None, dtype=torch.float32, pt=False):
    g = torch.Generator().manual_seed(3)
    sd = {}
    for name, (out, inp, rank) in modules.items():
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, inp, generator=g).to(dtype)
        sd[f"{name}.lora_up.weight"] = torch.randn(out, rank, generator=g).to(dtype)
        if alphas and name in alphas:
            sd[f"{name}.alpha"] = alphas[name] if pt else torch.tensor(alphas[name])
    torch.save(sd, str(path)) if pt else save_file(sd, str(path))
    return sd


def _update(sd, down_key, up_key, alpha_key=None):
    down, up = sd[down_key].double(), sd[up_key].double()
    scale = float(sd[alpha_key]) / down.shape[0] if alpha_key and alpha_key in sd else 1.0
    return up @ down * scale


def test_negative_and_zero_alpha_fold_without_hanging(tmp_path):
    """A slider LoRA's negative alpha keeps its sign; alpha 0 is a zero update, as diffusers reads it."""
    for alpha in (-2.0, 0.0):
        src = tmp_path / f"a{alpha}.safetensors"
        sd = _kohya(src, {"lora_unet_img_in": (64, 16, 4)}, {"lora_unet_img_in": alpha})
        out = tmp_path / f"d{alpha}.safetensors"
        assert run("remap", src, out, "--to", "diffusers", "--family", "flux.1").exit_code == 0
        d = load_file(out)
        torch.testing.assert_close(_update(d, "transformer.x_embedder.lora_A.weight",
                                           "transformer.x_embedder.lora_B.weight"),
                                   _update(sd, "lora_unet_img_in.lora_down.weight", "lora_unet_img_in.lora_up.weight",
                                           "lora_unet_img_in.alpha"))


@pytest.mark.parametrize("alpha", [float("nan"), float("inf")])
def test_a_nonfinite_alpha_is_refused(tmp_path, alpha):
    src = tmp_path / "k.safetensors"
    _kohya(src, {"lora_unet_img_in": (64, 16, 4)}, {"lora_unet_img_in": alpha})
    result = run("remap", src, tmp_path / "o.safetensors", "--to", "diffusers", "--family", "flux.1")
    assert result.exit_code == 1 and "nonfinite" in result.output and not (tmp_path / "o.safetensors").exists()


def test_a_pt_lora_with_plain_float_alphas(tmp_path):
    """torch.save of a kohya dict whose alpha is a Python float: read, never taken for alpha = rank."""
    src = tmp_path / "k.pt"
    sd = _kohya(src, {"lora_unet_img_in": (64, 16, 4)}, {"lora_unet_img_in": 2.0}, pt=True)
    out = tmp_path / "d.safetensors"
    assert run("remap", src, out, "--to", "diffusers", "--family", "flux.1").exit_code == 0
    d = load_file(out)
    torch.testing.assert_close(_update(d, "transformer.x_embedder.lora_A.weight",
                                       "transformer.x_embedder.lora_B.weight"),
                               _update(sd, "lora_unet_img_in.lora_down.weight", "lora_unet_img_in.lora_up.weight",
                                       "lora_unet_img_in.alpha"))
    torch.save({**sd, "note": "trained by me"}, str(tmp_path / "noted.pt"))
    result = run("remap", tmp_path / "noted.pt", tmp_path / "n.safetensors", "--to", "diffusers", "--family", "flux.1")
    assert result.exit_code == 1 and "note" in result.output


def test_ambiguous_or_broken_loras_are_refused_whole(tmp_path):
    cases = {
        "rank0": ({"lora_unet_img_in.lora_down.weight": torch.zeros(0, 16),
                   "lora_unet_img_in.lora_up.weight": torch.zeros(64, 0)}, "rank 1 or more"),
        "two_pairs": ({"diffusion_model.img_in.lora_A.weight": torch.zeros(2, 16),
                       "diffusion_model.img_in.lora_B.weight": torch.zeros(64, 2),
                       "diffusion_model.img_in.lora_down.weight": torch.zeros(2, 16),
                       "diffusion_model.img_in.lora_up.weight": torch.zeros(64, 2)}, "two down matrices"),
        "no_up": ({"lora_unet_img_in.lora_down.weight": torch.zeros(2, 16),
                   "lora_unet_img_in_2.lora_down.weight": torch.zeros(2, 16),
                   "lora_unet_img_in_2.lora_up.weight": torch.zeros(64, 2)}, "but not the other"),
        "collide": ({"unet.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 16),
                     "unet.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(16, 2),
                     "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 16),
                     "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(16, 2)}, "both"),
        "dtypes": ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 16),
                    "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(16, 2),
                    "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": torch.zeros(2, 16).bfloat16(),
                    "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": torch.zeros(16, 2).bfloat16()},
                   "dtype_mismatch"),
        "old_diffusers": ({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight":
                           torch.zeros(2, 16),
                           "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight":
                           torch.zeros(16, 2)}, "older attention-processor"),
        "odd_final": ({"lora_unet_final_layer_adaLN_modulation_1.lora_down.weight": torch.zeros(2, 16),
                       "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight": torch.zeros(31, 2),
                       "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.zeros(2, 16),
                       "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.zeros(16, 2)}, "two halves"),
    }
    for name, (sd, said) in cases.items():
        src = tmp_path / f"{name}.safetensors"
        save_file(sd, str(src))
        out = tmp_path / f"{name}.out.safetensors"
        target = "diffusers" if name in ("rank0", "two_pairs", "no_up", "odd_final") else "kohya"
        result = run("remap", src, out, "--to", target, "--family", "flux.1")
        assert result.exit_code in (1, 2) and said in result.output and "internal error" not in result.output, name
        assert not out.exists(), name


def test_kohya_unet_loras_in_either_names(tmp_path):
    """SD1 kohya names are diffusers' (sd-scripts trains on them) and SDXL's SGM's, but other tools write the other:
    both read to the same diffusers modules."""
    sgm = tmp_path / "sd1_sgm.safetensors"
    _kohya(sgm, {"lora_unet_input_blocks_1_1_proj_in": (320, 320, 2)})
    out = tmp_path / "sd1.safetensors"
    assert run("remap", sgm, out, "--to", "diffusers", "--family", "sd1").exit_code == 0
    assert "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight" in load_file(out)
    named = tmp_path / "sdxl_diffusers_names.safetensors"
    _kohya(named, {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": (640, 640, 2)})
    out = tmp_path / "sdxl.safetensors"
    assert run("remap", named, out, "--to", "diffusers", "--family", "sdxl").exit_code == 0
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in load_file(out)
    back = tmp_path / "back.safetensors"
    assert run("remap", out, back, "--to", "kohya", "--family", "sdxl").exit_code == 0
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in load_file(back)


def test_lora_transformer_prefix_is_diffusers_names_under_kohya(tmp_path):
    src = tmp_path / "k.safetensors"
    sd = _kohya(src, {"lora_transformer_single_transformer_blocks_0_attn_to_q": (64, 64, 2),
                      "lora_transformer_transformer_blocks_0_ff_context_net_0_proj": (256, 64, 2)},
                {"lora_transformer_single_transformer_blocks_0_attn_to_q": 1.0})
    out = tmp_path / "o.safetensors"
    assert run("remap", src, out, "--to", "diffusers", "--family", "flux.1").exit_code == 0
    d = load_file(out)
    torch.testing.assert_close(
        _update(d, "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight",
                "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight"),
        _update(sd, "lora_transformer_single_transformer_blocks_0_attn_to_q.lora_down.weight",
                "lora_transformer_single_transformer_blocks_0_attn_to_q.lora_up.weight",
                "lora_transformer_single_transformer_blocks_0_attn_to_q.alpha"))
    assert "transformer.transformer_blocks.0.ff_context.net.0.proj.lora_B.weight" in d


def test_a_fold_the_dtype_cannot_hold_is_refused(tmp_path):
    """fp16 weights times a huge alpha / rank overflow to inf, times a tiny one underflow to 0: refused, not written
    as "the same update"."""
    for alpha, said in ((1e6, "overflow"), (2.0 ** -40, "underflow")):
        src = tmp_path / f"k{alpha}.safetensors"
        _kohya(src, {"lora_unet_img_in": (64, 16, 4)}, {"lora_unet_img_in": alpha}, dtype=torch.float16)
        out = tmp_path / f"o{alpha}.safetensors"
        result = run("remap", src, out, "--to", "diffusers", "--family", "flux.1")
        assert result.exit_code == 1 and "lossy_cast" in result.output and said in result.output
        assert not out.exists()


def test_odd_alphas_are_refused_not_crashed(tmp_path):
    big = tmp_path / "big.pt"
    _kohya(big, {"lora_unet_img_in": (64, 16, 4)}, {"lora_unet_img_in": 2 ** 2000}, pt=True)
    result = run("remap", big, tmp_path / "o.safetensors", "--to", "diffusers", "--family", "flux.1")
    assert result.exit_code == 1 and "nonfinite" in result.output
    complex_alpha = tmp_path / "c.safetensors"
    sd = _kohya(tmp_path / "plain.safetensors", {"lora_unet_img_in": (64, 16, 4)})
    save_file({**sd, "lora_unet_img_in.alpha": torch.tensor(1 + 1j, dtype=torch.complex64)}, str(complex_alpha))
    result = run("remap", complex_alpha, tmp_path / "o.safetensors", "--to", "diffusers", "--family", "flux.1")
    assert result.exit_code == 1 and "not one real number" in result.output and "internal error" not in result.output


def test_lora_transformer_flux_lora_is_told_flux1(tmp_path):
    src = tmp_path / "k.safetensors"
    _kohya(src, {"lora_transformer_single_transformer_blocks_0_attn_to_q": (3072, 3072, 2)})
    assert json.loads(run("inspect", "--json", src).output)["identity"]["family"] == "flux.1"
