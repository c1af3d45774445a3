"""What `ckpttool fixtures` can write: each trainer's run of two saves made by its real library (skipped, with the
reason, where that library is not installed), its newest save healthy and damaged copies of it, each listed with
the problem code `verify --for-resume` gives it."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
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
    import json

    from ckpttool.synthetic import runs

    runs.accelerate_run(out, max_steps=4, every=2)
    for step in (2, 4):
        state = os.path.join(out, f"lora-step{step:08d}-state")
        os.rename(os.path.join(out, f"checkpoint-{step}"), state)
        with open(os.path.join(state, "train_state.json"), "w", encoding="utf-8") as f:
            json.dump({"current_epoch": 1, "current_step": step}, f)
    return out


def _simpletuner(out: str) -> str:
    """Accelerate's save_state completed as SimpleTuner's save hooks complete it: training_state.json, then the
    `.guard` file written last (a replica: SimpleTuner is an application, not a library)."""
    import json

    from ckpttool.synthetic import runs

    runs.accelerate_run(out, max_steps=4, every=2)
    for step in (2, 4):
        save = os.path.join(out, f"checkpoint-{step}")
        with open(os.path.join(save, "training_state.json"), "w", encoding="utf-8") as f:
            json.dump({"global_step": step, "epoch_step": step, "epoch": 1, "exhausted_backends": []}, f)
        with open(os.path.join(save, ".guard"), "w", encoding="utf-8") as f:
            f.write("complete")
    return out


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


@dataclass(frozen=True)
class Trainer:
    name: str
    libraries: tuple[str, ...]  # what must be importable
    made_by: str  # the library call that writes each save
    saves: str  # the run folder's entries that are saves (their numbers order them)
    write: Callable[[str], str] = field(repr=False)  # run folder -> run folder, two saves in it


TRAINERS = (
    Trainer("accelerate", ("accelerate",), "accelerate.Accelerator.save_state", r"checkpoint-\d+", _accelerate),
    Trainer("transformers", ("transformers", "accelerate"), "transformers.Trainer (save_steps)",
            r"checkpoint-\d+", _transformers),
    Trainer("lightning", ("lightning",), "lightning.Trainer with ModelCheckpoint", r"epoch=\d+-step=\d+\.ckpt",
            _lightning),
    Trainer("diffusers-lora", ("diffusers", "peft", "accelerate"),
            "accelerate.Accelerator.save_state with the diffusers LoRA scripts' save hooks", r"checkpoint-\d+",
            _diffusers_lora),
    Trainer("dcp", (), "torch.distributed.checkpoint.save (torchtitan's step-N layout)", r"step-\d+", _dcp),
    Trainer("reference", (), "ckpttool's reference trainer (python -m trainer)", r"checkpoint-\d+", _reference),
    Trainer("kohya", ("accelerate",), "a replica: accelerate.Accelerator.save_state named and completed as "
            "sd-scripts' train_network.py does (train_state.json)", r"lora-step\d+-state", _kohya),
    Trainer("simpletuner", ("accelerate",), "a replica: accelerate.Accelerator.save_state completed as SimpleTuner's "
            "save hooks do (training_state.json, .guard)", r"checkpoint-\d+", _simpletuner),
)


@dataclass
class Entry:
    path: str  # the checkpoint
    trainer: str
    damage: str | None  # None: healthy
    expected_code: str | None  # the error code `verify --for-resume` gives it (None: healthy)
    made_by: str

    def to_json(self) -> dict:
        return {"path": self.path, "trainer": self.trainer, "damage": self.damage,
                "expected_code": self.expected_code, "made_by": self.made_by}


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
    from ckpttool.model import ERROR
    from ckpttool.operations.verify import verify

    home = os.path.join(out, trainer.name)
    healthy_run = trainer.write(os.path.join(home, "healthy"))
    saves = saves_of(healthy_run, trainer.saves)
    newest, previous = saves[-1], saves[-2] if len(saves) > 1 else None
    entries = [Entry(newest, trainer.name, None, None, trainer.made_by)]
    before = {(p.code, p.path and os.path.relpath(p.path, healthy_run)) for p in
              verify(newest, for_resume=True, recall=False).problems}
    for kind in damages.kinds(newest, previous):
        if wanted is not None and kind.name not in wanted and kind.kind not in wanted:
            continue
        run = os.path.join(home, kind.name)
        shutil.copytree(healthy_run, run, symlinks=True)
        checkpoint = os.path.join(run, os.path.relpath(newest, healthy_run))
        damages.apply(checkpoint, kind, previous and os.path.join(run, os.path.relpath(previous, healthy_run)))
        new = [p for p in verify(checkpoint, for_resume=True, recall=False).problems if p.severity == ERROR
               and (p.code, p.path and os.path.relpath(p.path, run)) not in before]
        if not new:
            shutil.rmtree(run)
            continue
        entries.append(Entry(checkpoint, trainer.name, kind.name, str(new[0].code), trainer.made_by))
    return entries
