"""What `ckpttool fixtures` can write: each trainer's run of two saves, its newest save healthy and damaged copies of
it, each listed with the problem code `verify --for-resume` gives it. A run is made by the trainer's real library
where that is a pip-installable library that runs on a CPU in seconds (skipped, with the reason, where it is not
installed); for the others it is a copy of a small run their own code wrote, shipped in `samples/` (Megatron and
DeepSpeed need GPUs or a compiled op; NeMo, torchtune and Composer pin other torch versions; ai-toolkit, OneTrainer,
kohya, musubi-tuner and SimpleTuner are applications): the listing says which, and what wrote it."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable

from ckpttool.synthetic import damage as damages


def _accelerate(out: str) -> str:
    from ckpttool.synthetic import runs

    return runs.accelerate_run(out, max_steps=4, every=2)


def _transformers(out: str) -> str:
    from ckpttool.synthetic import runs

    return runs.transformers_run(out, max_steps=4, save_steps=2)


def _transformers_peft(out: str) -> str:
    from ckpttool.synthetic import runs

    return runs.transformers_peft_run(out, max_steps=4, save_steps=2)


def _lightning(out: str) -> str:
    from ckpttool.synthetic import runs

    return runs.lightning_run(out, max_steps=4, every=2)


def _diffusers_lora(out: str) -> str:
    from ckpttool.synthetic import runs

    return runs.diffusers_lora_run(out, max_steps=4, every=2)


def _dcp(out: str) -> str:
    from ckpttool.synthetic import runs

    return runs.torchtitan_run(out)


def _kohya(out: str) -> str:
    """Accelerate's save_state, named and completed as sd-scripts' train_network.py saves a step state: the dir
    `{name}-step{step:08d}-state` and its save hook's train_state.json (a replica: sd-scripts is not a library)."""
    from ckpttool.synthetic import replicas, runs

    runs.accelerate_run(out, max_steps=4, every=2)
    for step in (2, 4):
        state = os.path.join(out, f"lora-step{step:08d}-state")
        os.rename(os.path.join(out, f"checkpoint-{step}"), state)
        replicas.kohya_state(state, step)
    return out


def _simpletuner(out: str) -> str:
    """Accelerate's save_state completed as SimpleTuner's save hooks complete it: training_state.json, then the
    `.guard` file written last (a replica: SimpleTuner is an application, not a library)."""
    from ckpttool.synthetic import replicas, runs

    runs.accelerate_run(out, max_steps=4, every=2)
    for step in (2, 4):
        replicas.simpletuner_state(os.path.join(out, f"checkpoint-{step}"), step)
    return out


def _musubi(out: str) -> str:
    """Accelerate's save_state named as musubi-tuner's trainer_base.py names a step state,
    `{name}-step{step:08d}-state`, with nothing beside it: its save hook writes no train_state.json (a replica)."""
    from ckpttool.synthetic import runs

    runs.accelerate_run(out, max_steps=4, every=2)
    for step in (2, 4):
        os.rename(os.path.join(out, f"checkpoint-{step}"), os.path.join(out, f"lora-step{step:08d}-state"))
    return out


SAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples")
# the links a sample run holds: an installed wheel has a second copy of the target file in their place
SAMPLE_LINKS = {"composer/run": {"latest-rank0.pt": "ep0-ba6-rank0.pt"}}


def copy_sample(sample: str, dest: str) -> str:
    """A fresh, writable copy of a shipped sample run (`megatron/torch_dist_tp2`, ...) at dest, with its links (an
    install's read-only files and folders give no read-only copies)."""
    _copy_tree(os.path.join(SAMPLES, sample), dest, f"ckpttool's {sample} sample", copy_function=shutil.copyfile)
    for folder, _, _ in os.walk(dest):
        os.chmod(folder, os.stat(folder).st_mode | stat.S_IRWXU)
    for name, target in SAMPLE_LINKS.get(sample, {}).items():
        link = os.path.join(dest, name)
        if not os.path.islink(link):
            if os.path.lexists(link):
                os.remove(link)
            os.symlink(target, link)
    return dest


def _copy_tree(src: str, dest: str, what: str, **options):
    """shutil.copytree, its failure one line naming the first file it could not write (a full disk fails them all)."""
    from ckpttool.errors import OutputError

    try:
        shutil.copytree(src, dest, symlinks=True, **options)
    except shutil.Error as e:  # one (source, destination, why) per file: the first says it
        _, where, why = e.args[0][0]
        raise OutputError(f"{where}: could not copy {what} here: {why}") from None


def _sample(sample: str) -> Callable[[str], str]:
    return lambda out: copy_sample(sample, out)


def _reference(out: str) -> str:
    """The reference trainer shipped with ckpttool (`python -m trainer`), saving every 2 of 4 steps; run from the
    new folder it writes into, so that a `trainer.py` of the caller's own current folder is never what runs."""
    from ckpttool.errors import OutputError

    os.makedirs(out)
    done = subprocess.run([sys.executable, "-m", "trainer", "--output-dir", out, "--max-steps", "4",
                           "--checkpointing-steps", "2", "--batch-size", "8"], capture_output=True, text=True, cwd=out)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise OutputError(f"{out}: the reference trainer (python -m trainer) failed: {last}")
    return out


# how a trainer's run comes to be
LIBRARY = "library"  # written now by the trainer's own library, installed here
SAMPLE = "sample"  # copied from a small run the trainer's own code wrote (shipped in samples/)
REPLICA = "replica"  # an application's save imitated from its source (written now, or copied from samples/)


@dataclass(frozen=True)
class Trainer:
    name: str
    made: str  # LIBRARY, SAMPLE or REPLICA
    libraries: tuple[str, ...]  # what must be importable
    made_by: str  # the library call that writes each save, or what wrote the copied sample
    saves: str | tuple[str, str]  # the run folder's entries that are saves (their numbers order them), or the
    # previous and the newest save by their paths in the run
    write: Callable[[str], str] = field(repr=False)  # run folder -> run folder, two saves in it
    beside: tuple[str, ...] = ()  # files outside the save that its resume reads, by their paths from its folder
    world_size: int = 1  # the processes that wrote it: a resume with another number is refused where it matters


TRAINERS = (
    Trainer("accelerate", LIBRARY, ("accelerate",), "accelerate.Accelerator.save_state", r"checkpoint-\d+",
            _accelerate),
    Trainer("transformers", LIBRARY, ("transformers", "accelerate"), "transformers.Trainer (save_steps)",
            r"checkpoint-\d+", _transformers),
    Trainer("transformers-peft", LIBRARY, ("transformers", "accelerate", "peft"), "transformers.Trainer on a PEFT "
            "LoRA model (peft.get_peft_model: each save holds the adapter)", r"checkpoint-\d+", _transformers_peft),
    Trainer("lightning", LIBRARY, ("lightning",), "lightning.Trainer with ModelCheckpoint",
            r"epoch=\d+-step=\d+\.ckpt", _lightning),
    Trainer("diffusers-lora", LIBRARY, ("diffusers", "peft", "accelerate"),
            "accelerate.Accelerator.save_state with the diffusers LoRA scripts' save hooks", r"checkpoint-\d+",
            _diffusers_lora),
    Trainer("dcp", LIBRARY, (), "torch.distributed.checkpoint.save (torchtitan's step-N layout)", r"step-\d+", _dcp),
    Trainer("reference", LIBRARY, (), "ckpttool's reference trainer (python -m trainer)", r"checkpoint-\d+",
            _reference),
    Trainer("kohya", REPLICA, ("accelerate",), "a replica: accelerate.Accelerator.save_state named and completed "
            "as sd-scripts' train_network.py does (train_state.json)", r"lora-step\d+-state", _kohya),
    Trainer("simpletuner", REPLICA, ("accelerate",), "a replica: accelerate.Accelerator.save_state completed as "
            "SimpleTuner's save hooks do (training_state.json, .guard)", r"checkpoint-\d+", _simpletuner),
    Trainer("musubi-tuner", REPLICA, ("accelerate",), "a replica: accelerate.Accelerator.save_state named as "
            "musubi-tuner's trainer_base.py does (no train_state.json)", r"lora-step\d+-state", _musubi),
    Trainer("megatron", SAMPLE, (), "a copy of a run megatron-core 0.16.1 wrote (torch_dist, tensor parallel 2, "
            "two ranks under torchrun; fixtures/megatron_sample.py in ckpttool's repository)", r"iter_\d+",
            _sample("megatron/torch_dist_tp2"), world_size=2),
    Trainer("nemo", SAMPLE, (), "a copy of a run NeMo 2 (8cfedd7) wrote with nemo.lightning's ModelCheckpoint "
            "(tensor parallel 2 under torchrun, on CPU; fixtures/nemo_sample.py)",
            ("default--val_loss=2.2600-epoch=0-consumed_samples=16.0",
             "default--val_loss=2.1200-epoch=0-consumed_samples=32.0-last"), _sample("nemo/checkpoints"), world_size=2),
    Trainer("torchtune", SAMPLE, (), "a copy of a run torchtune 0.6.1's FullModelHFCheckpointer wrote as "
            "full_finetune_single_device saves (fixtures/torchtune_samples.py)", ("epoch_0", "epoch_1"),
            _sample("torchtune/full"), beside=("recipe_state/recipe_state.pt",)),
    Trainer("composer", SAMPLE, (), "a copy of a run Composer 0.32.1's Trainer wrote on CPU "
            "(fixtures/composer_samples.py)", r"ep\d+-ba\d+-rank0\.pt", _sample("composer/run")),
    Trainer("deepspeed", SAMPLE, (), "a copy of a run DeepSpeed's ZeRO-2 engine wrote (two ranks under torchrun, "
            "gloo on CPU; fixtures/deepspeed_runs.py)", r"global_step\d+", _sample("deepspeed/zero2"), world_size=2),
    Trainer("ai-toolkit", REPLICA, (), "a copy of a replica of an ai-toolkit LoRA job stopped after its step-4 save "
            "(its save code at 27a03a9, partly verbatim; fixtures/aitoolkit_samples.py)",
            r"mylora_\d+\.safetensors", _sample("aitoolkit/midrun/mylora"), beside=("optimizer.pt",)),
    Trainer("onetrainer", REPLICA, (), "a copy of a replica of a OneTrainer LoRA workspace (GenericTrainer's "
            "backups at 23df383, partly verbatim; fixtures/onetrainer_samples.py)",
            ("backup/2026-01-02_03-05-25-backup-8-1-3", "backup/2026-01-02_03-05-45-backup-10-2-0"),
            _sample("onetrainer/workspace")),
)


@dataclass
class Entry:
    path: str  # the checkpoint
    trainer: str
    damage: str | None  # None: healthy
    expected_code: str | None  # the error code `verify --for-resume` gives it (None: healthy)
    made: str  # LIBRARY, SAMPLE or REPLICA
    made_by: str
    world_size: int  # the processes that wrote it: check_resume(path, world_size=...) of a resume like it

    def to_json(self) -> dict:
        return {"path": self.path, "trainer": self.trainer, "damage": self.damage,
                "expected_code": self.expected_code, "made": self.made, "made_by": self.made_by,
                "world_size": self.world_size}


def missing_library(trainer: Trainer) -> str | None:
    """Why the trainer's fixtures cannot be made here (a library not installed, or failing to import), or None."""
    absent = [lib for lib in trainer.libraries if importlib.util.find_spec(lib) is None]
    if absent:
        return f"{', '.join(absent)} not installed (pip install 'ckpttool[fixtures]')"
    for lib in trainer.libraries:
        try:
            importlib.import_module(lib)
        except Exception as e:  # noqa: BLE001 - a library that cannot import skips its trainer, whatever it raises
            return f"{lib} fails to import ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    return None


def saves_of(run: str, pattern: str) -> list[str]:
    """The run's saves, oldest first."""
    names = [e for e in os.listdir(run) if re.fullmatch(pattern, e)]
    return [os.path.join(run, e) for e in sorted(names, key=lambda e: [int(n) for n in re.findall(r"\d+", e)])]


def make(out: str, trainer: Trainer, wanted: list[str] | None) -> list[Entry]:
    """The trainer's healthy run under out/<trainer>/healthy, and for each damage asked (None: all; a name such as
    `truncated-optimizer`, or a kind such as `truncated` for every part) a copy of the run with its newest save
    damaged, out/<trainer>/<damage>; a damage verify finds nothing in is not kept."""
    from ckpttool.model import DAMAGE, ERROR
    from ckpttool.operations.verify import verify

    from ckpttool.errors import OutputError

    home = os.path.join(out, trainer.name)
    try:
        healthy_run = trainer.write(os.path.join(home, "healthy"))
    except OSError as e:  # a full disk under the library's own save
        raise OutputError(f"{e.filename or home}: {trainer.name}'s run could not be written ({e.strerror or e})") \
            from None
    saves = ([os.path.join(healthy_run, e) for e in trainer.saves] if isinstance(trainer.saves, tuple) else
             saves_of(healthy_run, trainer.saves))
    newest, previous = saves[-1], saves[-2] if len(saves) > 1 else None
    entries = [Entry(newest, trainer.name, None, None, trainer.made, trainer.made_by, trainer.world_size)]
    before = {(p.code, p.path and os.path.relpath(p.path, healthy_run)) for p in
              verify(newest, for_resume=True, recall=False).problems}
    for kind in damages.kinds(newest, previous, trainer.beside):
        if wanted is not None and kind.name not in wanted and kind.kind not in wanted:
            continue
        run = os.path.join(home, kind.name)
        _copy_tree(healthy_run, run, f"{trainer.name}'s healthy run")
        checkpoint = os.path.join(run, os.path.relpath(newest, healthy_run))
        damages.apply(checkpoint, kind, previous and os.path.join(run, os.path.relpath(previous, healthy_run)))
        new = [p for p in verify(checkpoint, for_resume=True, recall=False).problems if p.severity == ERROR
               and (p.code, p.path and os.path.relpath(p.path, run)) not in before]
        if not new:
            shutil.rmtree(run)
            continue
        told = [p for p in new if p.code in DAMAGE] or new  # a flipped pickle byte is damage first, odd opcodes second
        entries.append(Entry(checkpoint, trainer.name, kind.name, str(told[0].code), trainer.made, trainer.made_by,
                             trainer.world_size))
    return entries
