"""`gated_load_checkpoint(engine, load_dir, tag=None, **load_kwargs)`: `engine.load_checkpoint` after ckpttool's gate.

With `tag=None`, DeepSpeed loads the tag its `latest` file names, unverified (deepspeed runtime/engine.py
load_checkpoint); here it is the newest tag under `load_dir` that passes the gate, each newer one skipped logged by
"ckpttool.gate". The live module is compared with the consolidated fp32 weights (full shapes under ZeRO-3, whose
parameters the engine holds partitioned), and the data-parallel world size with the one the tag was saved with: ZeRO
loads each rank's partition by rank, so another size is refused with the universal-checkpoint command.

`install_sealing(engine)` seals every tag dir `engine.save_checkpoint` writes with ckpttool's manifest
(ckpttool.integrations.sealing).
"""

from __future__ import annotations

import functools
import os

from ckpttool.gate import GateReport, ResumeGateError, check_resume, confirm_unchanged, latest_passing
from ckpttool.model import ERROR, Code, Problem


class FullShapes:
    """A module whose ZeRO-3 parameters are partitioned, seen with their full shapes (DeepSpeed's `ds_shape`); each
    parameter a one-element tensor broadcast to that shape, so tied parameters still share storage."""

    def __init__(self, module):
        self.module = module

    def state_dict(self):
        import torch

        placeholders = {}
        out = {}
        for name, value in self.module.state_dict(keep_vars=True).items():
            shape = tuple(getattr(value, "ds_shape", value.shape))
            if id(value) not in placeholders:
                placeholders[id(value)] = torch.zeros((), dtype=value.dtype).expand(shape)
            out[name] = placeholders[id(value)]
        return out


def _passing(engine, load_dir, tag, expected_step) -> GateReport:
    """The gate's report on the tag to load from `load_dir`: `tag` when it passes, else (tag None) the newest one
    that does."""
    model = FullShapes(engine.module)
    world = engine.dp_world_size
    if tag is not None:
        return check_resume(os.path.join(os.fspath(load_dir), tag), model=model, expected_step=expected_step,
                            world_size=world)
    passed = latest_passing(load_dir, model=model, expected_step=expected_step, world_size=world)
    if passed is None:
        raise ResumeGateError(os.fspath(load_dir), [Problem(Code.MISSING_FILE, ERROR,
                                                            f"no tag under {load_dir} passes the gate (each skipped "
                                                            "one is logged by ckpttool.gate)")])
    return passed


def gated_load_checkpoint(engine, load_dir, tag=None, expected_step=None, **load_kwargs):
    """engine.load_checkpoint(load_dir, tag, **load_kwargs) from a tag that passes the gate; returns what it does,
    once the tag's files are confirmed unchanged since the check."""
    passed = _passing(engine, load_dir, tag, expected_step)
    loaded = engine.load_checkpoint(load_dir, tag=os.path.basename(os.path.normpath(passed.path)), **load_kwargs)
    confirm_unchanged(passed)
    return loaded


def install_sealing(engine):
    """Seal each tag dir right after `engine.save_checkpoint` wrote it; returns the engine. save_checkpoint runs on
    every rank, each writing its own ZeRO partition, and ends with a barrier (deepspeed 0.19 runtime/engine.py
    save_checkpoint, after `latest`); its tag defaults to `global_step{engine.global_steps}`. Global rank 0 writes
    the manifest into `save_dir/tag`, between two barriers. A checkpoint engine that commits in the background (the
    decoupled one, which writes `latest` later) is still writing then: seal such saves with `ckpttool manifest`
    once they are committed."""
    from ckpttool.integrations.sealing import seal_after_save, torch_barrier

    original = engine.save_checkpoint

    @functools.wraps(original)
    def sealed_save_checkpoint(save_dir, tag=None, *args, **kwargs):
        tag = f"global_step{engine.global_steps}" if tag is None else tag
        result = original(save_dir, tag, *args, **kwargs)
        seal_after_save(os.path.join(os.fspath(save_dir), str(tag)), writes=engine.global_rank == 0,
                        barrier=torch_barrier)
        return result

    engine.save_checkpoint = sealed_save_checkpoint
    return engine
