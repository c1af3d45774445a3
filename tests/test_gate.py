import os

import pytest
import torch

from ckpttool.gate import ResumeGateError, check_resume
from fixtures.generate import TinyNet, _trained
from tests.helpers import copy


def live(steps=0, width=16):
    torch.manual_seed(0)
    model, opt, sched = _trained(steps)
    return (model if width == 16 else TinyNet(width=width)), opt, sched


@pytest.mark.parametrize("fixture", ["accelerate", "accelerate_bin", "accelerate_auto", "diffusers_lora",
                                     "kohya_state", "kohya_step_state", "simpletuner", "fsdp"])
def test_gate_passes_full_training_states(corpus, fixture):
    model, opt, sched = live()
    report = check_resume(corpus[fixture], model=model, optimizer=opt)
    assert report.ok and report.step == 3


@pytest.mark.parametrize("fixture,codes", [
    ("kohya_weights", {"weights_only"}), ("safetensors", {"weights_only"}),
    ("diffusers_truncated_newest", {"truncated"}),  # optimizer.bin is there, cut short
    ("simpletuner_tmp", {"missing_file"}), ("simpletuner_step_mismatch", {"step_mismatch"}),
    ("torch_step_mismatch", {"step_mismatch"}), ("sharded_missing", {"missing_file", "weights_only"}),
    ("family_missing_member", {"missing_file", "missing_optimizer"}), ("torch_malicious", {"unsafe_pickle",
                                                                                          "weights_only"}),
    ("dcp_missing_data", {"missing_file", "weights_only"}), ("torch_training", set()),
    ("torch_cuda", {"missing_scheduler"}),
])
def test_gate_refusals_carry_codes_and_fixes(corpus, fixture, codes, no_payload):
    model, opt, sched = live()
    if not codes:
        assert check_resume(corpus[fixture], model=model).ok
        return
    with pytest.raises(ResumeGateError) as err:
        check_resume(corpus[fixture], model=model)
    assert {p["code"] for p in err.value.problems} == codes
    assert all(p.get("fix") for p in err.value.problems if p["code"] != "missing_file" or "latest" in p.get("fix", ""))
    assert str(err.value).startswith(f"refusing to resume from {corpus[fixture]}")


def test_gate_weights_only_names_the_state_dir(corpus):
    with pytest.raises(ResumeGateError) as err:
        check_resume(corpus["kohya_weights"])
    assert "run-000001-state" in err.value.problems[0]["message"]


def test_gate_expected_step(corpus):
    assert check_resume(corpus["accelerate"], expected_step=3).ok
    with pytest.raises(ResumeGateError) as err:
        check_resume(corpus["accelerate"], expected_step=30)
    assert [p["code"] for p in err.value.problems] == ["step_mismatch"]


def test_gate_model_prefix_quantized_shape(corpus, tmp_path):
    d = copy(corpus["accelerate"], tmp_path)
    model = TinyNet()
    wrapped = torch.nn.DataParallel(model)
    with pytest.raises(ResumeGateError) as err:
        check_resume(d, model=wrapped)
    problem = err.value.problems[0]
    assert problem["code"] == "key_mismatch" and "--add-prefix module." in problem["fix"]
    with pytest.raises(ResumeGateError) as err:
        check_resume(d, model=TinyNet(width=24))
    assert {p["code"] for p in err.value.problems} == {"shape_mismatch"}
    # a quanto-quantized checkpoint against a plain model: one finding per module, with the remap command
    quant = copy(d, tmp_path, "quant")
    from safetensors.torch import save_file

    from fixtures.generate import _quantized
    sd, _ = _quantized("qint8")
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(quant, "model.safetensors"))
    with pytest.raises(ResumeGateError) as err:
        check_resume(quant, model=TinyNet(width=256))
    quantized = [p for p in err.value.problems if p["code"] == "quantized_keys"]
    assert [p["key"] for p in quantized] == ["linear_1", "linear_2"]
    assert f"ckpttool remap {quant} {quant}-dequantized --dequantize" in quantized[0]["fix"]


def test_gate_optimizer_groups(corpus):
    model = TinyNet()
    other = torch.optim.AdamW(list(model.parameters())[:3], lr=1e-3)
    with pytest.raises(ResumeGateError) as err:
        check_resume(corpus["accelerate"], model=model, optimizer=other)
    assert [p["code"] for p in err.value.problems] == ["optimizer_mismatch"]


def test_accelerate_hook_raises_before_loading(corpus, tmp_path):
    from accelerate import Accelerator

    from ckpttool.integrations.accelerate import install_resume_gate
    accelerator = Accelerator(cpu=True)
    model, opt, sched = live(0)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    install_resume_gate(accelerator)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    broken = copy(corpus["diffusers_truncated_newest"], tmp_path)
    with pytest.raises(ResumeGateError):
        accelerator.load_state(broken)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was loaded
    accelerator.load_state(corpus["accelerate_bin"])
    trained, _, _ = live(3)
    assert all(torch.equal(trained.state_dict()[k], v) for k, v in model.state_dict().items())


def test_accelerate_hook_checks_custom_objects_before_loading(corpus):
    from accelerate import Accelerator

    from ckpttool.integrations.accelerate import install_resume_gate
    accelerator = Accelerator(cpu=True)
    model, opt, sched = live(0)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    install_resume_gate(accelerator)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ResumeGateError) as err:  # the dir holds custom_checkpoint_0.pkl; nothing is registered
        accelerator.load_state(corpus["accelerate"])
    assert [p["code"] for p in err.value.problems] == ["custom_checkpoint_mismatch"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_gate_refuses_a_different_scheduler_class(corpus):
    model, opt, _ = live()
    other = torch.optim.lr_scheduler.StepLR(opt, step_size=10)  # the saved state has no step_size, gamma
    with pytest.raises(ResumeGateError) as e:
        check_resume(corpus["accelerate"], model=model, optimizer=opt, scheduler=other)
    assert [p["code"] for p in e.value.problems] == ["scheduler_mismatch"]
    assert "step_size" in e.value.problems[0]["message"]


def test_gate_only_warns_on_private_scheduler_keys_of_another_torch_version(corpus, tmp_path):
    model, opt, sched = live()
    d = copy(corpus["accelerate"], tmp_path)
    saved = torch.load(os.path.join(d, "scheduler.bin"), weights_only=True)
    saved["_an_older_torch_key"] = 1
    torch.save(saved, os.path.join(d, "scheduler.bin"))
    report = check_resume(d, model=model, optimizer=opt, scheduler=sched)
    assert report.ok and [p["code"] for p in report.problems] == ["scheduler_mismatch"]


class _Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 4)
        self.b = torch.nn.Linear(4, 2)


def test_a_model_on_the_meta_device_has_no_tied_weights(tmp_path):
    """Every meta tensor's storage points at 0: grouped by pointer alone, every key the checkpoint lacks was taken
    for a tied copy of one it holds, and the gate said nothing."""
    model = _Two()
    ckpt = {"model": {k: v for k, v in model.state_dict().items() if k.startswith("a.")}, "optimizer": {
        "state": {}, "param_groups": [{"params": [0, 1, 2, 3], "lr": 0.1}]}, "lr_scheduler": {
        "last_epoch": 0, "base_lrs": [0.1], "_step_count": 1}, "global_step": 0}
    torch.save(ckpt, tmp_path / "step_0.pt")
    with torch.device("meta"):
        on_meta = _Two()
    problems = {}
    for name, live_model in (("cpu", model), ("meta", on_meta)):
        with pytest.raises(ResumeGateError) as e:
            check_resume(tmp_path / "step_0.pt", model=live_model)
        problems[name] = sorted(p["code"] for p in e.value.problems)
    assert problems["meta"] == problems["cpu"] and "key_mismatch" in problems["meta"]


def test_the_remap_hint_tries_every_key(tmp_path):
    """A counter key first, with no counterpart in the model, beside `module.`-prefixed weights."""
    model = _Two()
    weights = {"averaged_steps": torch.tensor(3)}
    weights.update({f"module.{k}": v for k, v in model.state_dict().items()})
    from safetensors.torch import save_file

    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(ResumeGateError) as e:
        check_resume(tmp_path / "model.safetensors", model=model)
    fixes = [p.get("fix") or "" for p in e.value.problems]
    assert any("--strip-prefix module." in fix for fix in fixes), e.value


def test_the_gates_problems_are_the_contracts_plain_dicts(corpus, tmp_path):
    """A trainer logs, json.dumps, copies and compares the gate's problems as the documented dicts; and may raise or
    build the gate's objects with dicts of its own."""
    import json

    from ckpttool.gate import GateReport

    with pytest.raises(ResumeGateError) as err:
        check_resume(corpus["diffusers_truncated_newest"])
    problems = err.value.problems
    assert json.loads(json.dumps(problems)) == problems
    assert all(isinstance(p, dict) and "fix" in p and dict(p) == p for p in problems)
    assert {type(p["code"]) for p in problems} == {str} and problems[0]["severity"] == "error"
    mine = {"code": "step_mismatch", "severity": "error", "message": "my own check", "fix": "fix it"}
    assert "[step_mismatch] my own check" in str(ResumeGateError("x", [mine]))
    assert not GateReport("x", 3, [mine]).ok and GateReport("x", 3, []).ok


@pytest.mark.parametrize("step", [float("nan"), float("inf"), 2.5])
def test_an_optimizer_step_that_is_no_count_is_not_read_as_one(tmp_path, step):
    """An optimizer state whose `step` is NaN, inf or not whole counts nothing: inspect and verify report the file
    (no internal error), and the gate answers with ResumeGateError or a report, never an escaping exception."""
    from ckpttool.operations.inspect import inspect
    from ckpttool.operations.verify import verify

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    state = opt.state_dict()
    for per_param in state["state"].values():
        per_param["step"] = step
    path = str(tmp_path / "train.pt")
    torch.save({"model": model.state_dict(), "optimizer": state, "global_step": 1}, path)
    assert inspect(path)["step"] == 1
    assert verify(path, recall=False).step == 1
    try:
        check_resume(path, model=model, optimizer=opt)
    except ResumeGateError:
        pass


def test_a_refusal_survives_pickling(corpus):
    """A launcher or a process pool carries the refusal to another process whole."""
    import pickle

    with pytest.raises(ResumeGateError) as err:
        check_resume(corpus["diffusers_truncated_newest"])
    again = pickle.loads(pickle.dumps(err.value))
    assert again.path == err.value.path and again.problems == err.value.problems and str(again) == str(err.value)
