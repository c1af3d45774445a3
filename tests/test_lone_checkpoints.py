"""Issue 32: what a lone checkpoint's own files imply (ckpttool/trainers/implications.py), and one save's counters that
every file carries alike (steps.Judge.mixed): each rule provoked on files the real libraries wrote, and the healthy
runs clean."""

import os
import shutil

import pytest
import torch

from ckpttool.operations.verify import verify

DATA = os.path.join(os.path.dirname(__file__), "data")


def _problems(path):
    report = verify(path, for_resume=True)
    return [(p.severity.value, p.code.value, p.message) for p in report.problems]


def _lone(run, name, tmp_path, drop=None, as_name=None):
    """A copy of one checkpoint of `run`, alone in its folder (no sibling to compare with), without `drop`."""
    dst = tmp_path / "lone" / (as_name or name)
    shutil.copytree(os.path.join(run, name), dst)
    if drop:
        os.remove(dst / drop)
    return str(dst)


@pytest.mark.parametrize("as_name", ["checkpoint-4", "my_state"])
def test_healthy_lone_accelerate_saves_stay_clean(runs, tmp_path, as_name):
    for run in ("accelerate", "accelerate_two_models"):
        assert _problems(_lone(runs[run], "checkpoint-4", tmp_path / run, as_name=as_name)) == []


def test_initial_lr_means_a_scheduler_was_attached(runs, tmp_path):
    """A diffusers-script checkpoint (its scripts always prepare the scheduler) without scheduler_1.bin: an error; a
    plain save_state dir: a warning (a scheduler may never have been prepared)."""
    two = runs["accelerate_two_models"]
    found = _problems(_lone(two, "checkpoint-4", tmp_path, drop="scheduler_1.bin"))
    assert [(s, c) for s, c, _ in found] == [("error", "missing_scheduler")]
    assert "optimizer_1.bin has initial_lr" in found[0][2]
    found = _problems(_lone(runs["accelerate"], "checkpoint-4", tmp_path / "plain", drop="scheduler.bin",
                            as_name="my_state"))
    assert [(s, c) for s, c, _ in found] == [("warning", "missing_scheduler")]


def test_a_scheduler_without_its_optimizer(runs, tmp_path):
    found = _problems(_lone(runs["accelerate_two_models"], "checkpoint-4", tmp_path, drop="optimizer_1.bin"))
    assert [(s, c) for s, c, _ in found] == [("warning", "missing_optimizer")]
    assert found[0][2].startswith("scheduler_1.bin has no optimizer of its own")


def test_a_scheduler_whose_optimizer_no_file_holds(runs, tmp_path):
    """scheduler_1 steps an optimizer of two param groups, and the only optimizer left has one: an error."""
    lone = _lone(runs["accelerate_two_models"], "checkpoint-4", tmp_path, drop="optimizer_1.bin")
    state = torch.load(os.path.join(lone, "scheduler_1.bin"), weights_only=True)
    state["base_lrs"] = state["base_lrs"] * 2
    torch.save(state, os.path.join(lone, "scheduler_1.bin"))
    found = _problems(lone)
    assert [(s, c) for s, c, _ in found] == [("error", "missing_optimizer")]
    assert "steps an optimizer of 2 param group(s)" in found[0][2]


def test_a_numbered_optimizer_needs_its_model(runs, tmp_path):
    found = _problems(_lone(runs["accelerate_two_models"], "checkpoint-4", tmp_path, drop="model_1.safetensors"))
    assert [(s, c) for s, c, _ in found] == [("error", "missing_file")]
    assert "optimizer_1.bin holds the state of" in found[0][2] and "the model it trains" in found[0][2]


def test_a_lightning_scheduler_built_beside_configure_optimizers(tmp_path):
    """Lightning saves the schedulers configure_optimizers returned: an optimizer with initial_lr and an empty
    lr_schedulers list lost its schedule on resume (a warning: the run may rebuild it from the step)."""
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    path = str(tmp_path / "epoch=0-step=1.ckpt")
    torch.save({"epoch": 0, "global_step": 1, "pytorch-lightning_version": "2.6.6", "state_dict": model.state_dict(),
                "optimizer_states": [optimizer.state_dict()], "lr_schedulers": []}, path)
    found = _problems(path)
    assert ("warning", "missing_scheduler") in [(s, c) for s, c, _ in found]


def test_dcp_rank_files_of_two_saves(tmp_path):
    """transformers FSDP2 (2 ranks): rank 0's optimizer file from checkpoint-2 in checkpoint-4, the stale file the
    issue measured clean: an error naming both steps and files."""
    run = shutil.copytree(os.path.join(DATA, "fsdp", "transformers_fsdp2_sharded"), tmp_path / "run")
    stale = "optimizer_0/__0_0.distcp"
    shutil.copy(run / "checkpoint-2" / stale, run / "checkpoint-4" / stale)
    found = _problems(str(run / "checkpoint-4"))
    assert [(s, c) for s, c, _ in found] == [("error", "step_mismatch")]
    assert "mixes saves" in found[0][2] and "2 in optimizer_0/__0_0.distcp but 4 in optimizer_0/__1_0.distcp" in \
        found[0][2]


def test_zero_partitions_of_two_saves(tmp_path):
    run = shutil.copytree(os.path.join(DATA, "deepspeed", "transformers_zero2"), tmp_path / "run")
    name = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shutil.copy(run / "checkpoint-3" / "global_step3" / name, run / "checkpoint-6" / "global_step6" / name)
    found = _problems(str(run / "checkpoint-6"))
    assert [(s, c) for s, c, _ in found] == [("error", "step_mismatch")]
    assert f"3 in {name} but 6 in zero_pp_rank_0" in found[0][2]


def test_accelerate_rng_files_of_two_saves(tmp_path):
    """Every process's random_states_N.pkl of one save carries the same Accelerator.step."""
    run = shutil.copytree(os.path.join(DATA, "fsdp", "accelerate_fsdp_sharded"), tmp_path / "run")
    rng = run / "checkpoint-4" / "random_states_1.pkl"
    state = torch.load(rng, weights_only=False)  # the suite's own fixture
    state["step"] = 3
    torch.save(state, rng)
    found = _problems(str(run / "checkpoint-4"))
    assert [(s, c) for s, c, _ in found] == [("error", "step_mismatch")]
    assert "Accelerator.step" in found[0][2] and "0 in random_states_0.pkl but 3 in random_states_1.pkl" in \
        found[0][2]


@pytest.mark.parametrize("run, files", [("fsdp/transformers_fsdp2_sharded", 2), ("fsdp/accelerate_fsdp_sharded", 0),
                                        ("deepspeed/transformers_zero2", 2)])
def test_every_rank_file_read_in_healthy_saves(run, files):
    """The healthy multi-rank saves stay clean, and their optimizer step is read from every rank's file that holds
    one (DCP's planner wrote all six of Accelerate FSDP1's `step` items from rank 1: one file, nothing to compare)."""
    from ckpttool.checkpoint import open_checkpoint
    from ckpttool.model import OPTIMIZER_UPDATES

    folder = os.path.join(DATA, run)
    newest = max(os.listdir(folder), key=lambda e: int(e.split("-")[-1]) if e.startswith("checkpoint") else -1)
    path = os.path.join(folder, newest)
    assert _problems(path) == []
    sources = [s for s in open_checkpoint(path).steps if s.meaning == OPTIMIZER_UPDATES]
    assert len(sources) == 1 and len(sources[0].per_file) == files
    assert all(v == sources[0].value for _, v in sources[0].per_file)


def test_schedulers_that_name_no_base_lrs_and_groups_added_later(tmp_path):
    """No false alarm where a scheduler's state keeps its rates elsewhere (SequentialLR's `_schedulers`), names none
    (ReduceLROnPlateau), or steps fewer groups than the optimizer came to have (Lightning's BackboneFinetuning adds a
    group after the scheduler was built)."""
    def lightning_file(case, optimizer, schedulers):
        (tmp_path / case).mkdir()
        path = str(tmp_path / case / "epoch=0-step=1.ckpt")
        torch.save({"epoch": 0, "global_step": 1, "pytorch-lightning_version": "2.6.6", "state_dict": {},
                    "optimizer_states": [optimizer.state_dict()], "lr_schedulers": schedulers}, path)
        return path

    def stepped(params):
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        for p in params:
            p.grad = torch.ones_like(p)
        return optimizer

    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    opt = stepped([a])
    warm = torch.optim.lr_scheduler.LinearLR(opt, 0.5, total_iters=2)
    seq = torch.optim.lr_scheduler.SequentialLR(opt, [warm, torch.optim.lr_scheduler.ConstantLR(opt)], [2])
    opt.step()
    seq.step()
    assert _problems(lightning_file("sequential", opt, [seq.state_dict()])) == []

    opt = stepped([a])
    plain = torch.optim.lr_scheduler.StepLR(opt, 1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    opt.step()
    assert _problems(lightning_file("plateau", opt, [plain.state_dict(), plateau.state_dict()])) == []

    opt = stepped([a])
    later = torch.optim.lr_scheduler.StepLR(opt, 1)
    opt.add_param_group({"params": [b], "lr": 1e-4})
    b.grad = torch.ones_like(b)
    opt.step()
    later.step()
    assert _problems(lightning_file("group_added", opt, [later.state_dict()])) == []


def test_hostile_rates_and_counters_are_no_crash(runs, tmp_path):
    """Rates that are lists holding themselves, and a counter of 5000 digits, read as nothing to compare."""
    lone = _lone(runs["accelerate"], "checkpoint-4", tmp_path)
    for name, key in (("optimizer.bin", "param_groups"), ("scheduler.bin", "base_lrs")):
        state = torch.load(os.path.join(lone, name), weights_only=True)
        looped = []
        looped.append(looped)
        if key == "param_groups":
            state[key][0]["initial_lr"] = looped
        else:
            state[key] = looped
        torch.save(state, os.path.join(lone, name))
    rng = os.path.join(lone, "random_states_0.pkl")
    state = torch.load(rng, weights_only=False)  # the suite's own fixture
    state["step"] = 10 ** 5000
    torch.save(state, rng)
    assert all(code != "internal_error" for _, code, _ in _problems(lone))


def test_dcp_files_that_lag_without_an_earlier_save_to_blame_are_a_warning(tmp_path):
    """A rank file whose parameters some steps left without a gradient (a frozen part, then fine-tuned) lags the
    others in a healthy save: a warning, unless it holds what it held in the run's earlier save (the stale case
    above)."""
    run = shutil.copytree(os.path.join(DATA, "fsdp", "transformers_fsdp2_sharded"), tmp_path / "run")
    stale = "optimizer_0/__0_0.distcp"
    shutil.copy(run / "checkpoint-2" / stale, run / "checkpoint-4" / stale)
    shutil.rmtree(run / "checkpoint-2")
    found = _problems(str(run / "checkpoint-4"))
    assert [(s, c) for s, c, _ in found] == [("warning", "step_mismatch")]
    assert "some steps left without a gradient" in found[0][2]


def test_a_lagging_dcp_file_is_an_error_only_when_an_earlier_save_holds_it_byte_for_byte(tmp_path):
    """A healthy file lags where its parameters had no gradient for some steps, but it still holds its shards of
    what changed; only a file left by an earlier save is byte for byte that save's (any earlier one, not only the
    nearest)."""
    from ckpttool.model import Checkpoint
    from ckpttool.steps import Judge
    from ckpttool.trainers.base import Profile

    saves = {}
    for step in (2, 4, 6):
        folder = tmp_path / f"step-{step}"
        folder.mkdir()
        (folder / "__0_0.distcp").write_bytes(b"rank 0 at %d" % step)
        (folder / "__1_0.distcp").write_bytes(b"rank 1 at %d" % step)
        saves[step] = str(folder)

    def verdict(values):
        ckpt = Checkpoint(saves[6], "dcp", "torch.distributed.checkpoint")
        judge = Judge(ckpt, Profile(), saves)
        judge.step = 6
        judge.earlier = [2, 4]
        assert judge.mixed("the optimizer state step", values, exact=False)
        return [(p.severity.value, p.message) for p in judge.problems]

    found = verdict({"__0_0.distcp": 3, "__1_0.distcp": 6})
    assert [s for s, _ in found] == ["warning"]
    (tmp_path / "step-6" / "__0_0.distcp").write_bytes(b"rank 0 at 2")  # left by the save at step 2
    found = verdict({"__0_0.distcp": 2, "__1_0.distcp": 6})
    assert [s for s, _ in found] == ["error"] and "byte for byte the one in the run's save at step 2" in found[0][1]


def test_a_real_lightning_run_whose_scheduler_was_built_beside_configure_optimizers(tmp_path):
    """lightning.Trainer saving a module that builds a LambdaLR on its optimizer but returns only the optimizer:
    the .ckpt's lr_schedulers is empty though the optimizer carries initial_lr, and a resume restarts the schedule
    (a warning); the same run returning the scheduler verifies clean."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from fixtures.generate import TinyNet

    class Module(L.LightningModule):
        def __init__(self, returned):
            super().__init__()
            self.net, self.returned = TinyNet(), returned

        def training_step(self, batch, _index):
            return self.net(batch).float().pow(2).mean()

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
            return {"optimizer": optimizer, "lr_scheduler": scheduler} if self.returned else optimizer

    data = torch.utils.data.DataLoader([torch.randint(0, 10, (8,)) for _ in range(8)], batch_size=4)
    found = {}
    for returned in (True, False):
        out = tmp_path / str(returned)
        trainer = L.Trainer(default_root_dir=out, max_steps=2, accelerator="cpu", devices=1, logger=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[ModelCheckpoint(dirpath=out, every_n_train_steps=2, save_top_k=-1)])
        trainer.fit(Module(returned), data)
        found[returned] = [(s, c) for s, c, _ in _problems(str(out / "epoch=0-step=2.ckpt"))]
    assert found == {True: [], False: [("warning", "missing_scheduler")]}
