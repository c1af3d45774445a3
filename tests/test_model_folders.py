"""Model folders as people share them, written by the real save_pretrained (fixtures/model_folders.py): transformers
(single file and sharded), a diffusers pipeline (UNet, VAE, CLIP text encoder, scheduler), a PEFT adapter, and a
Hugging Face cache snapshot of symlinks into blobs/."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckpttool.gate import ResumeGateError, check_resume
from tests.helpers import cli, codes


def cut(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("name,layout,tensors", [
    ("gpt2", "transformers model folder (save_pretrained)", 16),
    ("gpt2_sharded", "transformers model folder (save_pretrained)", 16),
    ("hub_snapshot", "transformers model folder (save_pretrained)", 16),
])
def test_transformers_folders_are_model_folders_not_accelerate_dirs(model_folders, name, layout, tensors):
    result, report = cli("inspect", "--json", model_folders[name])
    assert result.exit_code == 0 and report["format"] == "pretrained" and report["layout"] == layout
    assert report["trainer"] is None and report["tensors"] == tensors and report["problems"] == []
    config = report["metadata"]["configs"]["model"]
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["tie_word_embeddings"] is True
    assert cli("verify", model_folders[name])[0].exit_code == 0


def test_pipeline_components_each_read_by_their_own_layout(model_folders):
    result, report = cli("inspect", "--json", model_folders["pipeline"])
    assert result.exit_code == 0 and report["format"] == "pipeline" and report["problems"] == []
    parts = {c["name"]: c for c in report["components"]}
    assert set(parts) == {"unet", "vae", "text_encoder"} and all(p["parameters"] > 0 for p in parts.values())
    assert report["metadata"]["non_weight_parts"] == {"scheduler": "diffusers.DDPMScheduler"}
    assert report["metadata"]["configs"]["unet"]["_class_name"] == "UNet2DConditionModel"
    text = cli("inspect", model_folders["pipeline"])[0].output
    assert "scheduler (diffusers.DDPMScheduler)" in text and "text_encoder" in text
    assert cli("verify", model_folders["pipeline"])[0].exit_code == 0
    _, unet = cli("inspect", "--json", os.path.join(model_folders["pipeline"], "unet"))
    assert unet["layout"] == "diffusers model folder (save_pretrained)" and unet["tensors"] == parts["unet"]["tensors"]


def test_damage_in_a_folder_is_a_report_with_a_code(model_folders, tmp_path):
    sharded = shutil.copytree(model_folders["gpt2_sharded"], tmp_path / "sharded")
    os.remove(sharded / "model-00002-of-00004.safetensors")
    pipeline = shutil.copytree(model_folders["pipeline"], tmp_path / "pipeline")
    cut(pipeline / "vae" / "diffusion_pytorch_model.safetensors")
    unnamed = shutil.copytree(model_folders["pipeline"], tmp_path / "no_unet")
    shutil.rmtree(unnamed / "unet")
    config = shutil.copytree(model_folders["gpt2"], tmp_path / "config")
    cut(config / "config.json")
    for path, code, words in ((sharded, "missing_file", "shard model-00002"), (pipeline, "truncated", "vae"),
                              (unnamed, "missing_file", "names unet"), (config, "corrupt", "config.json")):
        result, report = cli("verify", "--json", path)
        assert result.exit_code == 1 and code in codes(report, "error"), report
        assert any(words in p["message"] for p in report["problems"])
        assert cli("inspect", "--json", path)[0].exit_code == 1


def test_config_is_checked_against_the_weights(model_folders, tmp_path):
    folder = shutil.copytree(model_folders["gpt2"], tmp_path / "gpt2")
    config = json.load(open(folder / "config.json"))
    config["torch_dtype"] = config["dtype"] = "float16"
    json.dump(config, open(folder / "config.json", "w"))
    result, report = cli("verify", "--json", folder)
    assert result.exit_code == 0 and codes(report, "warning") == ["dtype_mismatch"]
    assert "torch_dtype float16" in report["problems"][0]["message"]
    from transformers import GPT2Config, GPT2LMHeadModel  # lm_head.weight is tied, so save_pretrained dropped it

    live = GPT2LMHeadModel(GPT2Config(vocab_size=10, n_positions=8, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ResumeGateError) as err:
        check_resume(model_folders["gpt2"], model=live)
    assert {p["code"] for p in err.value.problems} == {"weights_only"}  # the tied key is no mismatch


def test_weights_only_hint_names_the_state_dir_beside_the_folder(model_folders, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(model_folders["pipeline"], run / "checkpoint-500" / "exported")
    (run / "checkpoint-500" / "optimizer.bin").write_bytes(b"")
    _, report = cli("verify", "--json", "--for-resume", run / "checkpoint-500" / "exported")
    assert codes(report, "error") == ["weights_only"]
    assert str(run / "checkpoint-500") in report["problems"][0]["message"]


def test_diff_convert_and_plot_per_component(model_folders, tmp_path):
    other = shutil.copytree(model_folders["pipeline"], tmp_path / "other")
    weights = other / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1
    save_file(tensors, weights, metadata={"format": "pt"})
    result, report = cli("diff", "--json", model_folders["pipeline"], model_folders["pipeline"])
    assert result.exit_code == 0 and report["same"] and {c["component"] for c in report["components"]} == {
        "unet", "vae", "text_encoder"}
    result, report = cli("diff", "--json", "--values", model_folders["pipeline"], other)
    assert result.exit_code == 1 and report["different_components"] == ["vae"]
    assert [d["key"] for d in report["values"]["different"]] == [f"vae/{first}"]
    assert "DIFFERENT: vae" in cli("diff", "--values", model_folders["pipeline"], other)[0].output
    assert cli("diff", "--values", "--plot", tmp_path / "change.png", model_folders["pipeline"], other)[0].exit_code == 1
    assert (tmp_path / "change.png").stat().st_size > 0
    result, _ = cli("convert", model_folders["pipeline"], tmp_path / "converted")
    assert result.exit_code == 0 and sorted(os.listdir(tmp_path / "converted")) == [
        "text_encoder.safetensors", "unet.safetensors", "vae.safetensors"]
    unet = load_file(os.path.join(model_folders["pipeline"], "unet", "diffusion_pytorch_model.safetensors"))
    got = load_file(tmp_path / "converted" / "unet.safetensors")
    assert got.keys() == unet.keys() and all(torch.equal(got[k], unet[k]) for k in got)
    assert cli("convert", "--component", "vae", model_folders["pipeline"], tmp_path / "vae.safetensors")[0].exit_code == 0
    assert load_file(tmp_path / "vae.safetensors").keys() == tensors.keys()


def test_cache_snapshot_followed_named_and_never_written(model_folders):
    snapshot = model_folders["hub_snapshot"]
    before = sorted(os.listdir(snapshot))
    assert all(os.path.islink(os.path.join(snapshot, f)) for f in before)
    _, report = cli("inspect", "--json", snapshot)
    assert report["metadata"]["hf_cache"] == {"repo_id": "tiny/gpt2", "revision": os.path.basename(snapshot)}
    assert "tiny/gpt2 at revision" in cli("inspect", snapshot)[0].output
    sizes = {f: os.path.getsize(os.path.join(snapshot, f)) for f in before}  # the blobs' sizes, through the links
    assert report["file_bytes"] == sum(sizes[f] for f in ("config.json", "model.safetensors"))
    result, _ = cli("manifest", snapshot)
    assert result.exit_code == 2 and "writes nothing into the cache" in result.stderr
    assert sorted(os.listdir(snapshot)) == before and cli("verify", snapshot)[0].exit_code == 0


def test_peft_adapter_folder(model_folders):
    _, report = cli("inspect", "--json", model_folders["adapter"])
    assert report["trainer"] == "peft" and report["tensors"] > 0 and report["problems"] == []


def test_sentence_transformers_modules(model_folders, tmp_path):
    """The layout sentence-transformers' save writes (modules.json; not a test extra): the top-level transformers
    folder, a Pooling module without weights, a Dense module with its own model.safetensors."""
    root = shutil.copytree(model_folders["gpt2"], tmp_path / "st")
    os.makedirs(root / "1_Pooling")
    (root / "1_Pooling" / "config.json").write_text('{"word_embedding_dimension": 16}')
    os.makedirs(root / "2_Dense")
    (root / "2_Dense" / "config.json").write_text('{"in_features": 16, "out_features": 4}')
    save_file({"linear.weight": torch.zeros(4, 16)}, root / "2_Dense" / "model.safetensors")
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]
    (root / "modules.json").write_text(json.dumps(modules))
    _, report = cli("inspect", "--json", root)
    assert report["layout"] == "sentence-transformers model folder (save_pretrained)" and report["problems"] == []
    assert {c["name"]: c["tensors"] for c in report["components"]} == {"model": 16, "2": 1}
    shutil.rmtree(root / "2_Dense")
    result, report = cli("verify", "--json", root)
    assert result.exit_code == 1 and codes(report, "error") == ["missing_file"]


def test_report_measures_change_per_component(runs):
    """A run whose checkpoints hold several models (Accelerate with two): each one's modules, named after it."""
    from ckpttool.operations.report import report

    result = report(runs["accelerate_two_models"])
    modules = {m["module"].split("/")[0] for m in result["changes"][0]["modules"]}
    assert modules == {"model", "model_1"}
