"""The gate inside the trainers people use, proved with the real libraries on the CPU: a healthy resume through the
hook ends with the same weights as the same resume without it; a cut newest checkpoint is skipped (logged) and the
one before is resumed; a mismatched model is refused before any weight or step changes; a pickle that would run code
is refused before torch.load runs on it. Also `latest_valid`, world sizes and YAML configs."""

import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from ckpttool.gate import ResumeGateError, check_resume, latest_valid
from fixtures.generate import MARKER_NAME, TinyNet, _Payload
from ckpttool.synthetic.runs import _batches, _quiet, transformers_run
from ckpttool.synthetic.catalog import SAMPLES as SHIPPED
from tests.helpers import cli

DATA = os.path.join(os.path.dirname(__file__), "data")


def cut(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def plant_payload(path, marker):
    """Replace `path` with a torch.save'd pickle that creates `marker` when it is loaded with weights_only=False."""
    torch.save({"state": _Payload(marker)}, path)


def same(a, b) -> bool:
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- latest_valid and the world size ---

def test_latest_valid_skips_the_cut_newest_and_logs_it(corpus, caplog):
    caplog.set_level(logging.WARNING, "ckpttool.gate")
    run = os.path.dirname(corpus["diffusers_truncated_newest"])
    assert latest_valid(run) == os.path.join(run, "checkpoint-3")
    assert any("skipping" in r.message and "checkpoint-5" in r.message and "truncated" in r.message
               for r in caplog.records)
    assert latest_valid(os.path.join(run, "nothing-here")) is None


def test_world_size_rng_files_are_a_warning_zero_partitions_an_error():
    two_ranks = os.path.join(DATA, "fsdp", "accelerate_fsdp_full", "checkpoint-4")
    assert check_resume(two_ranks, world_size=2).problems == []
    report = check_resume(two_ranks, world_size=1)
    assert report.ok and [p["code"] for p in report.problems] == ["world_size_mismatch"]
    assert "not bit-exact" in report.problems[0]["message"]
    with pytest.raises(ResumeGateError, match="ds_to_universal"):
        check_resume(os.path.join(SHIPPED, "deepspeed", "zero2"), world_size=1)


# --- transformers.Trainer ---

def _trainer(out, max_steps=8, width=16, peft=False):
    _quiet()
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=10, n_positions=8, n_embd=width, n_layer=1, n_head=2))
    if peft:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"], lora_alpha=4))
    data = [{"input_ids": ids, "labels": ids} for ids in torch.cat(_batches(16))]
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, save_strategy="no", learning_rate=1e-3,
                             per_device_train_batch_size=4, warmup_steps=2, lr_scheduler_type="linear", report_to=[],
                             use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    return Trainer(model=model, args=args, train_dataset=data)


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    return transformers_run(str(tmp_path_factory.mktemp("hf") / "run"), max_steps=6, save_steps=2)


@pytest.mark.parametrize("sample,width,vocab,positions", [
    ("fsdp/transformers_fsdp1_full/checkpoint-4", 16, 10, 8), ("fsdp/transformers_fsdp1_sharded/checkpoint-4", 16, 10, 8),
    ("fsdp/transformers_fsdp2_sharded/checkpoint-4", 16, 10, 8), ("deepspeed/transformers_zero2/checkpoint-6", 8, 32, 16),
])
def test_transformers_layouts_of_ddp_fsdp_and_deepspeed_pass_with_the_live_model(runs, sample, width, vocab,
                                                                                   positions):
    """What the Trainer writes on 2 ranks (FSDP on 2 GPUs, ZeRO-2 and DDP on the CPU), gated against its model."""
    _quiet()
    from transformers import GPT2Config, GPT2LMHeadModel

    def model(w=width, v=vocab, p=positions):
        return GPT2LMHeadModel(GPT2Config(vocab_size=v, n_positions=p, n_embd=w, n_layer=1, n_head=2))

    def codes(path, live, world):  # save_pretrained drops GPT-2's tied lm_head.weight: a warning, as documented
        return [p["code"] for p in check_resume(path, model=live, world_size=world).problems
                if not (p["code"] == "key_mismatch" and "tied in the model" in p["message"])]

    assert codes(os.path.join(DATA, sample), model(), 2) == []
    ddp = os.path.join(runs["transformers_ddp"], "checkpoint-4")
    assert codes(ddp, model(16, 10, 8), 2) == []
    assert codes(ddp, model(16, 10, 8), 1) == ["world_size_mismatch"]


def test_transformers_gated_train_refuses_files_swapped_before_the_first_step(hf_run, tmp_path):
    """A rolling save renames a new optimizer.pt over the checked one after the gate passed it: the Trainer loads
    other bytes than were checked, and gated_train stops before the first step."""
    from transformers import TrainerCallback

    from ckpttool.integrations.transformers import gated_train

    run = shutil.copytree(hf_run, tmp_path / "a")
    ckpt = os.path.join(run, "checkpoint-6")

    class Swapper(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            new = os.path.join(ckpt, "optimizer.pt.new")
            shutil.copyfile(os.path.join(ckpt, "optimizer.pt"), new)
            os.replace(new, os.path.join(ckpt, "optimizer.pt"))

    trainer = _trainer(run)
    trainer.add_callback(Swapper())
    with pytest.raises(ResumeGateError) as e:
        gated_train(trainer, resume_from_checkpoint=ckpt)
    assert "optimizer.pt changed between the gate's check" in str(e.value) and trainer.state.global_step == 6


def test_transformers_gated_train_resumes_as_train_does(hf_run, tmp_path):
    from ckpttool.integrations.transformers import gated_train

    gated = _trainer(shutil.copytree(hf_run, tmp_path / "a"))
    gated_train(gated, resume_from_checkpoint=True)
    plain = _trainer(shutil.copytree(hf_run, tmp_path / "b"))
    plain.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-6"))
    assert gated.state.global_step == plain.state.global_step == 8 and same(gated.model, plain.model)


def test_transformers_cut_newest_is_skipped_and_the_one_before_resumed(hf_run, tmp_path, caplog):
    from ckpttool.integrations.transformers import gated_train

    caplog.set_level(logging.WARNING, "ckpttool.gate")
    run = shutil.copytree(hf_run, tmp_path / "a")
    cut(run / "checkpoint-6" / "model.safetensors")
    gated = _trainer(run)
    gated_train(gated, resume_from_checkpoint=True)
    assert any("skipping" in r.message and "checkpoint-6" in r.message for r in caplog.records)
    plain = _trainer(shutil.copytree(hf_run, tmp_path / "b"))
    plain.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-4"))
    assert same(gated.model, plain.model)


def test_transformers_mismatched_model_is_refused_before_anything_changes(hf_run, tmp_path):
    from ckpttool.integrations.transformers import gated_train

    trainer = _trainer(shutil.copytree(hf_run, tmp_path / "a"), width=32)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(ResumeGateError, match="shape_mismatch"):
        gated_train(trainer, resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"))
    with pytest.raises(ResumeGateError, match="no checkpoint under"):  # and no checkpoint of the run fits it
        gated_train(trainer, resume_from_checkpoint=True)
    assert trainer.state.global_step == 0 and trainer.optimizer is None
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_transformers_peft_adapter_must_be_on_both_sides(runs, hf_run, tmp_path):
    from ckpttool.integrations.transformers import gated_train

    lora_run = shutil.copytree(runs["transformers_peft"], tmp_path / "lora")
    with pytest.raises(ResumeGateError, match="key_mismatch"):  # a plain model cannot take an adapter checkpoint
        gated_train(_trainer(tmp_path / "plain"), resume_from_checkpoint=str(lora_run / "checkpoint-4"))
    with pytest.raises(ResumeGateError, match="key_mismatch"):  # nor a PEFT model a checkpoint without its adapter
        gated_train(_trainer(tmp_path / "peft", peft=True), resume_from_checkpoint=f"{hf_run}/checkpoint-6")
    gated = _trainer(lora_run, max_steps=6, peft=True)
    gated_train(gated, resume_from_checkpoint=True)
    assert gated.state.global_step == 6


def test_transformers_unsafe_pickle_is_refused_before_torch_load(hf_run, tmp_path):
    from ckpttool.integrations.transformers import gated_train

    run = shutil.copytree(hf_run, tmp_path / "a")
    marker = tmp_path / MARKER_NAME
    plant_payload(run / "checkpoint-6" / "optimizer.pt", marker)
    with pytest.raises(ResumeGateError, match="unsafe_pickle"):
        gated_train(_trainer(run), resume_from_checkpoint=str(run / "checkpoint-6"))
    gated = _trainer(run)
    gated_train(gated, resume_from_checkpoint=True)  # falls back to checkpoint-4
    assert gated.state.global_step == 8 and not marker.exists()


# --- Lightning ---

def _lightning_trainer(root, plugins=(), max_steps=6):
    import lightning as L

    return L.Trainer(default_root_dir=str(root), max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                     plugins=list(plugins))


def _module(width=16):
    import lightning as L

    from ckpttool.synthetic.runs import lightning_module

    L.seed_everything(0, verbose=False)
    return lightning_module(width)


def _data():
    return torch.utils.data.DataLoader([b for b in torch.cat(_batches(16))], batch_size=4)


def test_lightning_gated_checkpoint_io_resumes_as_lightning_does(runs, tmp_path):
    from ckpttool.integrations.lightning import GatedCheckpointIO

    run = shutil.copytree(runs["lightning"], tmp_path / "run")
    gated, plain = _module(), _module()
    _lightning_trainer(tmp_path / "g", [GatedCheckpointIO(model=gated)], 8).fit(gated, _data(),
                                                                                 ckpt_path=run / "epoch=0-step=6.ckpt")
    _lightning_trainer(tmp_path / "p", max_steps=8).fit(plain, _data(), ckpt_path=run / "epoch=0-step=6.ckpt")
    assert same(gated, plain)


def test_lightning_cut_newest_falls_back_when_asked(runs, tmp_path, caplog):
    from ckpttool.integrations.lightning import GatedCheckpointIO

    caplog.set_level(logging.WARNING, "ckpttool.gate")
    run = shutil.copytree(runs["lightning"], tmp_path / "run")
    cut(run / "epoch=0-step=6.ckpt")
    cut(run / "last.ckpt")  # save_last's copy of step 6, cut by the same crash
    with pytest.raises(ResumeGateError, match="truncated|corrupt"):
        _lightning_trainer(tmp_path / "a", [GatedCheckpointIO()], 8).fit(_module(), _data(),
                                                                        ckpt_path=run / "epoch=0-step=6.ckpt")
    gated, plain = _module(), _module()
    _lightning_trainer(tmp_path / "b", [GatedCheckpointIO(fallback=True)], 8).fit(
        gated, _data(), ckpt_path=run / "epoch=0-step=6.ckpt")
    assert any("resuming from" in r.message and "step=4" in r.message for r in caplog.records)
    _lightning_trainer(tmp_path / "c", max_steps=8).fit(plain, _data(), ckpt_path=run / "epoch=0-step=4.ckpt")
    assert same(gated, plain)


def test_lightning_mismatched_model_and_unsafe_pickle_refused_before_torch_load(runs, tmp_path):
    from ckpttool.integrations.lightning import GatedCheckpointIO

    run = shutil.copytree(runs["lightning"], tmp_path / "run")
    wide = _module(width=32)
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    with pytest.raises(ResumeGateError, match="shape_mismatch"):
        _lightning_trainer(tmp_path / "a", [GatedCheckpointIO(model=wide)], 8).fit(
            wide, _data(), ckpt_path=run / "epoch=0-step=6.ckpt")
    assert all(torch.equal(before[k], v) for k, v in wide.state_dict().items())
    marker = tmp_path / MARKER_NAME
    plant_payload(run / "last.ckpt", marker)
    with pytest.raises(ResumeGateError, match="unsafe_pickle"):
        _lightning_trainer(tmp_path / "b", [GatedCheckpointIO()], 8).fit(_module(), _data(),
                                                                        ckpt_path=run / "last.ckpt")
    assert not marker.exists()


def test_lightning_sharded_dirs_through_the_strategy_hook(tmp_path):
    """A sharded strategy loads its checkpoint dir without CheckpointIO: install_resume_gate gates the strategy's own
    load_checkpoint (here recorded, as FSDP needs GPUs) and falls back to the newest valid sibling."""
    from ckpttool.integrations.lightning import install_resume_gate

    run = shutil.copytree(os.path.join(DATA, "fsdp", "lightning_fsdp_sharded"), tmp_path / "run")
    os.remove(run / "epoch=0-step=4.ckpt" / "meta.pt")
    trainer = _lightning_trainer(tmp_path / "t")
    loaded = []
    trainer.strategy.load_checkpoint = lambda path, *a, **k: loaded.append(path) or {}
    install_resume_gate(trainer)
    with pytest.raises(ResumeGateError, match="missing_file"):
        trainer.strategy.load_checkpoint(run / "epoch=0-step=4.ckpt")
    install_resume_gate(trainer, fallback=True)
    trainer.strategy.load_checkpoint(run / "epoch=0-step=4.ckpt")
    assert loaded == [str(run / "epoch=0-step=2.ckpt")]


# --- Accelerate, automatic checkpoint naming ---

def _automatic(project, model):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from ckpttool.synthetic.runs import _accelerator

    _accelerator()  # resets Accelerate's process-wide state
    accelerator = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(project),
                                                                            automatic_checkpoint_naming=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return accelerator, accelerator.prepare(model, optimizer, scheduler)


def test_accelerate_load_state_takes_the_newest_valid_checkpoint(tmp_path, caplog):
    from ckpttool.integrations.accelerate import install_resume_gate

    caplog.set_level(logging.WARNING, "ckpttool.gate")
    torch.manual_seed(0)
    accelerator, (model, optimizer, scheduler) = _automatic(tmp_path, TinyNet())
    saved = []
    for batch in _batches(3):
        accelerator.backward(model(batch).float().pow(2).mean())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        accelerator.save_state()
        saved.append({k: v.clone() for k, v in model.state_dict().items()})
    cut(tmp_path / "checkpoints" / "checkpoint_2" / "model.safetensors")
    accelerator, (fresh, _, _) = _automatic(tmp_path, TinyNet())
    install_resume_gate(accelerator)
    accelerator.load_state()
    assert all(torch.equal(saved[1][k], v) for k, v in fresh.state_dict().items())  # checkpoint_1's weights
    assert any("skipping" in r.message and "checkpoint_2" in r.message for r in caplog.records)
    accelerator, _ = _automatic(tmp_path, TinyNet())
    install_resume_gate(accelerator, fallback=False)
    with pytest.raises(ResumeGateError, match="checkpoint_2"):
        accelerator.load_state()


# --- DeepSpeed ---

class RecordingEngine:
    """What gated_load_checkpoint uses of a DeepSpeed engine: its module, its data-parallel size, load_checkpoint."""

    def __init__(self, dp_world_size):
        from fixtures.deepspeed_runs import tiny_model

        self.module, self.dp_world_size, self.loaded = tiny_model(), dp_world_size, []

    def load_checkpoint(self, load_dir, tag=None, **kwargs):
        self.loaded.append((load_dir, tag))
        return os.path.join(load_dir, tag), {}


def test_deepspeed_gated_load_checkpoint_picks_the_newest_valid_tag(tmp_path, caplog):
    from ckpttool.integrations.deepspeed import gated_load_checkpoint

    caplog.set_level(logging.WARNING, "ckpttool.gate")
    run = shutil.copytree(os.path.join(DATA, "deepspeed", "zero3"), tmp_path / "zero3")
    engine = RecordingEngine(dp_world_size=2)
    gated_load_checkpoint(engine, run)
    cut(run / "global_step5" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    gated_load_checkpoint(engine, run)
    assert engine.loaded == [(run, "global_step5"), (run, "global_step3")]  # not the tag `latest` still names
    assert any("skipping" in r.message and "global_step5" in r.message for r in caplog.records)
    with pytest.raises(ResumeGateError, match="world_size_mismatch"):
        gated_load_checkpoint(RecordingEngine(dp_world_size=4), run, tag="global_step3")


def test_deepspeed_hook_with_the_real_engine(tmp_path):
    """Where DeepSpeed is installed (it builds from source: not a test extra): 2 ranks on the CPU load a save
    through the hook and without it, to the same weights; with the newest tag cut, the hook loads the one before."""
    pytest.importorskip("deepspeed")
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def torchrun(*args):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "-m", "fixtures.deepspeed_runs", *args], capture_output=True, text=True, env=env,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    out = str(tmp_path / "run")
    torchrun(out, "2")
    torchrun(out, "resume", "2", "plain")
    torchrun(out, "resume", "2", "gated")
    plain, gated = torch.load(f"{out}.resumed-plain.pt"), torch.load(f"{out}.resumed-gated.pt")
    assert plain["tag"] == gated["tag"] == "global_step5"
    assert all(torch.equal(plain["module"][k], gated["module"][k]) for k in plain["module"])
    cut(os.path.join(out, "global_step5", "zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    torchrun(out, "resume", "2", "gated")
    assert torch.load(f"{out}.resumed-gated.pt")["tag"] == "global_step3"


# --- configs as their parsers read them ---

@pytest.mark.parametrize("text", [
    "base_model: gpt2\nresume_from_checkpoint: \"{ckpt}\"  # the run to continue\nglobal_step: 3\n",   # axolotl style
    "job: extension\nconfig:\n  process:\n    - type: sd_trainer\n      train: {{global_step: 3, epoch: 1.0}}\n"
    "      resume_from_checkpoint: '{ckpt}'\n",                                                       # ai-toolkit style
    "defaults: &d\n  global_step: 3\ntrain:\n  <<: *d\n  resume_from_checkpoint: {ckpt}\n",           # anchors
])
def test_yaml_configs_are_read_by_a_yaml_parser(corpus, tmp_path, text):
    config = tmp_path / "train.yaml"
    config.write_text(text.format(ckpt=corpus["simpletuner"]))
    result, report = cli("verify", "--json", "--config", config)
    assert result.exit_code == 0 and report["path"] == corpus["simpletuner"], result.output


def test_yaml_keeps_hash_inside_quotes_and_says_where_it_breaks(corpus, tmp_path):
    odd = tmp_path / "runs#1"
    shutil.copytree(corpus["simpletuner"], odd / "checkpoint-3")
    config = tmp_path / "train.yml"
    config.write_text(f"resume_from_checkpoint: \"{odd}/checkpoint-3\"\nglobal_step: 4\n")
    result, report = cli("verify", "--json", "--config", config)
    assert result.exit_code == 1 and "global_step is 4" in report["problems"][0]["message"]
    config.write_text("train: {global_step: 3\nepoch: [1\n")
    result, _ = cli("verify", "--config", config)
    assert result.exit_code == 2 and "not valid YAML at line" in result.stderr and "Traceback" not in result.stderr
