import os

import pytest
import torch
from safetensors.torch import load_file

from ckpttool.checkpoint import open_checkpoint
from ckpttool.model import MICRO_STEPS, SAVES
from ckpttool.operations.inspect import inspect
from ckpttool.steps import global_step
from ckpttool.tensors import load_tensor


def steps_of(ckpt):
    return {s.source: (s.kind, s.value, s.note) for s in ckpt.steps}


def names(ckpt):
    return [c.name for c in ckpt.components]


def test_real_accelerate_save_state(corpus):
    ckpt = open_checkpoint(corpus["accelerate"])
    assert ckpt.format == "accelerate" and ckpt.layout == "Accelerate save_state dir"
    assert names(ckpt) == ["model", "optimizer", "scheduler", "random_states_0", "custom_checkpoint_0"]
    assert ckpt.component("custom_checkpoint_0").role == "custom"
    assert ckpt.problems == []
    steps = steps_of(ckpt)
    assert steps["optimizer state step"][:2] == ("step", 3)
    assert steps["scheduler last_epoch"][:2] == ("step", 3)
    # Accelerate's RNG `step` is the accumulation counter: recorded with that meaning, never compared
    assert ckpt.trainer == "accelerate"
    assert next(s.meaning for s in ckpt.steps if s.source == "random_states_0 step") == MICRO_STEPS
    expected = load_file(os.path.join(corpus["accelerate"], "model.safetensors"))
    assert {t.name: load_tensor(t).sum().item() for t in ckpt.model.tensors} == \
        {k: v.sum().item() for k, v in expected.items()}


def test_accelerate_bin_and_automatic_naming(corpus):
    ckpt = open_checkpoint(corpus["accelerate_bin"])
    assert ckpt.model.files[0].endswith("pytorch_model.bin") and len(ckpt.model.tensors) == 6
    auto = open_checkpoint(corpus["accelerate_auto"])
    assert "checkpoint_N" in auto.layout
    # checkpoint_N counts saves, not steps: shown with that meaning, and the step comes from the optimizer
    assert next(s.meaning for s in auto.steps if s.source == "directory name") == SAVES
    assert global_step(auto) == 3


def test_diffusers_unet_subfolder_and_lora(corpus):
    ckpt = open_checkpoint(corpus["diffusers"])
    assert ckpt.layout == "diffusers checkpoint-N"
    assert ckpt.component("unet").role == "model"
    assert ckpt.component("unet").files[0].endswith(os.path.join("unet", "diffusion_pytorch_model.safetensors"))
    assert steps_of(ckpt)["directory name"][:2] == ("step", 3)
    lora = open_checkpoint(corpus["diffusers_lora"])
    assert lora.component("lora").files[0].endswith("pytorch_lora_weights.safetensors")


def test_a_state_dirs_sharded_bin_subfolder_is_read_as_from_pretrained_reads_it(corpus, tmp_path):
    """A unet/ saved as .bin shards with pytorch_model.bin.index.json-style index is a component, like a single file."""
    import json
    import shutil

    from safetensors.torch import load_file

    ckpt_dir = tmp_path / "checkpoint-3"
    shutil.copytree(corpus["diffusers"], ckpt_dir)
    unet = ckpt_dir / "unet"
    tensors = load_file(unet / "diffusion_pytorch_model.safetensors")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"diffusion_pytorch_model-00001-of-00002.bin": names[:half],
              "diffusion_pytorch_model-00002-of-00002.bin": names[half:]}
    for shard, keys in shards.items():
        torch.save({k: tensors[k] for k in keys}, unet / shard)
    (unet / "diffusion_pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}))
    ckpt = open_checkpoint(str(ckpt_dir))
    assert ckpt.component("unet").role == "model" and len(ckpt.component("unet").tensors) == len(names)
    assert not [p for p in ckpt.problems if p.severity == "error"]


@pytest.mark.parametrize("case", ["cut_safetensors_beside_bin_shards", "stale_index_beside_single_file",
                                  "junk_bin_index_beside_safetensors"])
def test_a_subfolder_is_judged_by_the_file_from_pretrained_loads(corpus, tmp_path, case):
    """Of several weights files in a save_pretrained subfolder, the one from_pretrained loads decides (transformers:
    model.safetensors before its index, .bin after; diffusers: its safetensors index, then safetensors, then .bin):
    a cut safetensors file is damage whatever .bin shards lie beside it; a stale index or a junk .bin index beside the
    file that is loaded is no alarm."""
    import json
    import shutil

    ckpt_dir = tmp_path / "checkpoint-3"
    shutil.copytree(corpus["diffusers"], ckpt_dir)
    unet = ckpt_dir / "unet"
    single = unet / "diffusion_pytorch_model.safetensors"
    if case == "cut_safetensors_beside_bin_shards":
        torch.save(load_file(single), unet / "diffusion_pytorch_model-00001-of-00001.bin")
        (unet / "diffusion_pytorch_model.bin.index.json").write_text(json.dumps(
            {"weight_map": {k: "diffusion_pytorch_model-00001-of-00001.bin" for k in load_file(single)}}))
        with open(single, "r+b") as f:
            f.truncate(single.stat().st_size // 2)
    elif case == "stale_index_beside_single_file":  # transformers names: save_pretrained leaves an old index behind
        encoder = ckpt_dir / "text_encoder"
        encoder.mkdir()
        shutil.copy(single, encoder / "model.safetensors")
        shutil.copy(unet / "config.json", encoder / "config.json")
        (encoder / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"w": "model-00001-of-00002.safetensors"}}))
    else:
        (unet / "diffusion_pytorch_model.bin.index.json").write_text("{not json")
    errors = {p.code for p in open_checkpoint(str(ckpt_dir)).problems if p.severity == "error"}
    assert errors == ({"truncated"} if case == "cut_safetensors_beside_bin_shards" else set())


def test_truncated_member_is_reported_not_raised(corpus):
    ckpt = open_checkpoint(corpus["diffusers_truncated_newest"])
    assert [(p.code, os.path.basename(p.path)) for p in ckpt.problems] == [("truncated", "optimizer.bin")]
    assert ckpt.component("optimizer") is None


def test_kohya_state_dirs(corpus):
    ckpt = open_checkpoint(corpus["kohya_state"])
    assert ckpt.layout == "kohya -state dir"
    steps = steps_of(ckpt)
    assert steps["directory name"][:2] == ("epoch", 1)  # {name}-{epoch:06d}-state
    assert steps["train_state.json current_step"][:2] == ("step", 3)
    assert steps["train_state.json current_epoch"][:2] == ("epoch", 1)
    assert steps_of(open_checkpoint(corpus["kohya_step_state"]))["directory name"][:2] == ("step", 3)


def test_simpletuner(corpus):
    ckpt = open_checkpoint(corpus["simpletuner"])
    assert ckpt.layout == "SimpleTuner checkpoint-N"
    assert ckpt.trainer == "simpletuner" and ckpt.problems == []
    assert steps_of(ckpt)["training_state.json global_step"][:2] == ("step", 3)
    assert open_checkpoint(corpus["simpletuner_tmp"]).trainer == "simpletuner"


def test_dcp_dir(corpus):
    ckpt = open_checkpoint(corpus["dcp"])
    assert ckpt.format == "dcp"
    tensors = {t.name: t for t in ckpt.model.tensors}
    assert "linear_1.weight" in tensors  # the {"model": state_dict} part is the model component
    assert list(ckpt.metadata["objects"]) == ["step"]
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    target = os.path.join(os.path.dirname(corpus["dcp"]), "as_torch.pt")
    dcp_to_torch_save(corpus["dcp"], target)
    reference = torch.load(target, weights_only=True)["model"]
    for name, value in reference.items():
        t = tensors[name]
        assert t.shape == tuple(value.shape) and torch.equal(load_tensor(t), value)


def test_dcp_missing_data_file(corpus):
    ckpt = open_checkpoint(corpus["dcp_missing_data"])
    assert [p.code for p in ckpt.problems] == ["missing_file"]


def test_fsdp_sharded_state_dir(corpus):
    ckpt = open_checkpoint(corpus["fsdp"])
    assert {c.name: c.role for c in ckpt.components} == {"model": "model", "optimizer": "optimizer",
                                                        "scheduler": "scheduler"}
    assert len(ckpt.model.tensors) == 6
    assert "linear_1.weight" in {t.name for t in ckpt.model.tensors}
    assert "state.0.exp_avg" in {t.name for t in ckpt.component("optimizer").tensors}


def test_sharded_index_and_folder(corpus):
    by_folder = open_checkpoint(corpus["sharded"])
    by_index = open_checkpoint(os.path.join(corpus["sharded"], "model.safetensors.index.json"))
    assert by_folder.format == by_index.format == "sharded"
    assert len(by_folder.model.tensors) == len(by_index.model.tensors) == 6
    assert by_folder.problems == []
    assert len(open_checkpoint(corpus["sharded_bin"]).model.tensors) == 4


def test_sharded_missing_shard(corpus):
    ckpt = open_checkpoint(corpus["sharded_missing"])
    problem = ckpt.problems[0]
    assert problem.code == "missing_file" and "model-00002-of-00003" in problem.message


def test_family_member_finds_siblings(corpus):
    ckpt = open_checkpoint(corpus["family"])
    assert names(ckpt) == ["model", "ema_0.9999", "opt", "target_model"]
    assert {c.name: c.role for c in ckpt.components}["ema_0.9999"] == "ema"
    assert steps_of(ckpt)["file name"][:2] == ("step", 3)
    assert ckpt.problems == []
    # any member names the same family
    opt = open_checkpoint(os.path.join(os.path.dirname(corpus["family"]), "opt000003.pt"))
    assert names(opt) == names(ckpt)


def test_family_missing_member(corpus):
    ckpt = open_checkpoint(corpus["family_missing_member"])
    assert [p.code for p in ckpt.problems] == ["missing_file"]
    assert ckpt.problems[0].path.endswith("opt000005.pt")


@pytest.mark.parametrize("qtype,expected", [("qint8", "qint8"), ("qint4", "qint4"), ("qint2", "qint2"),
                                            ("qfloat8", "qfloat8_e4m3fn")])
def test_quanto_qtypes_inferred_and_mapped(corpus, qtype, expected):
    report = inspect(corpus[f"quanto_{qtype}"])
    q = report["quantization"]
    assert q["library"] == "optimum-quanto"
    assert q["qtypes"] == {expected: 2}
    assert {m["module"] for m in q["modules"]} == {"linear_1", "linear_2"}
    assert q["quantization_map"].endswith("quanto_qmap.json")
    assert {m["qtype_source"] for m in q["modules"]} == {"quantization map"}


def test_quanto_qtype_inferred_without_map(corpus):
    q = inspect(corpus["quanto_qint4_pt_nomap"])["quantization"]
    assert q["qtypes"] == {"qint4": 2} and q["quantization_map"] is None
    assert {m["qtype_source"] for m in q["modules"]} == {"inferred from dtype and shape"}


def test_plain_checkpoint_has_no_quantization(corpus):
    assert inspect(corpus["safetensors"])["quantization"] is None
