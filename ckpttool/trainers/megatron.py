"""Megatron-LM (megatron/training/checkpointing.py save_checkpoint, load_checkpoint, read_metadata,
get_checkpoint_name; megatron-core dist_checkpointing serialization.py, strategies/torch.py, read at core_v0.16.1):
`--ckpt-format torch_dist` saves `{save}/iter_{N:07d}/` (or `release/`) as a torch.distributed.checkpoint dir whose
tensor-parallel shards are chunks of one global tensor (layers stacked on a leading axis), the RNG state of every
(pp, tp) rank as `rng_state/shard_*` bytes items, `metadata.json` (written last: "metadata.json is written only if
the checkpoint is complete"), and up to core 0.18 `common.pt`, rank 0's torch.save of the rest: `args` (an
argparse.Namespace), `iteration`, `checkpoint_version`, `opt_param_scheduler`, the optimizer's param groups.
After every rank finished and a barrier, rank 0 writes `{save}/latest_checkpointed_iteration.txt` (the iteration or
`release`): load_checkpoint resumes from the iteration it names and nothing else. `--save-retain-interval` deletes
the previous iteration unless it is a multiple of the interval.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

from ckpttool.model import ERROR, GLOBAL_STEP, WARNING, Code, Component, Problem, Record, StepSource
from ckpttool.trainers.base import Profile, marker_text

NAME = re.compile(r"iter_(\d{7,})")
TRACKER = "latest_checkpointed_iteration.txt"
CONFIG, COMMON, INTEGRITY = "metadata.json", "common.pt", "integrity.json"
SOURCE = ("Megatron-LM megatron/training/checkpointing.py (save_checkpoint, load_checkpoint, read_metadata, "
          "get_checkpoint_name, generate_state_dict), megatron-core 0.16.1 dist_checkpointing (serialization.py save/"
          "load, strategies/common.py save_common, strategies/torch.py, mapping.py ShardedObject.unique_key)")
MODEL_HEADS = ("embedding", "decoder", "encoder", "output_layer", "pooler", "lm_head", "model")
# args the checkpoint was saved with that say how it was split (check_checkpoint_args, the (TP, PP) comparison in
# load_checkpoint) and what it chose not to save
LAYOUT_ARGS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
               "context_parallel_size", "world_size", "data_parallel_size", "use_distributed_optimizer")


def tracker_iteration(run_dir: str) -> int | str | None:
    """What the run's tracker names: an iteration, "release", "" when it holds anything else (read_metadata then
    prints "ERROR: Invalid metadata file" and exits), or None when there is no tracker."""
    text = marker_text(run_dir, TRACKER)
    if text is None:
        return None
    text = text.strip()
    if text == "release":
        return text
    return int(text) if text.isascii() and text.isdigit() else ""


def _named_save(run_dir: str, named: int | str | None) -> str | None:
    """The save dir a tracker value names (get_checkpoint_name); None for no tracker or an unreadable one."""
    if named is None or named == "":
        return None
    return os.path.join(run_dir, "release" if named == "release" else f"iter_{named:07d}")


def _backend(path: str) -> bool:
    """Whether metadata.json is the CheckpointingConfig dist_checkpointing writes (check_is_distributed_checkpoint)."""
    try:
        config = json.loads(marker_text(path, CONFIG) or "null")
    except (ValueError, RecursionError):
        return False
    return isinstance(config, dict) and "sharded_backend" in config


def integrity_problems(path: str) -> list[Problem]:
    """Megatron's own manifest (`--verify-integrity`, core 0.18+, validation.py save_integrity_manifest):
    integrity.json {"algorithm": "sha256", "files": {name: hex}} over the dir's top-level files, checked as
    verify_integrity_manifest does on load, which raises CheckpointingException on any difference."""
    import hashlib

    from ckpttool.hashing import read_pieces

    manifest = os.path.join(path, INTEGRITY)
    try:
        doc = json.loads(marker_text(path, INTEGRITY) or "null")
    except (ValueError, RecursionError):
        doc = None
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict) or doc.get("algorithm") != "sha256":
        return [Problem(Code.CORRUPT, ERROR, f"{INTEGRITY} is not a sha256 manifest: verify_integrity_manifest "
                        "raises on load", manifest)]
    problems = []
    for name, expected in sorted(files.items()):
        full = os.path.join(path, str(name))
        if os.sep in str(name) or str(name) in ("", ".", "..") or not os.path.isfile(full) or os.path.islink(full):
            problems.append(Problem(Code.MISSING_FILE, ERROR, f"{name}, listed in {INTEGRITY}, is not in the "
                                    "checkpoint", full))
            continue
        digest = hashlib.sha256()
        for piece in read_pieces(full, 0, os.path.getsize(full)):
            digest.update(piece)
        if digest.hexdigest() != expected:
            problems.append(Problem(Code.CHECKSUM_MISMATCH, ERROR, f"{name} does not match its sha256 in {INTEGRITY}: "
                                    "changed since Megatron saved it", full))
    return problems


class Megatron(Profile):
    name = "megatron"
    layout = "Megatron torch_dist iter_N"
    source = SOURCE
    name_pattern = NAME
    saves_rng = True
    latest_rule = f"load_checkpoint: the iteration {TRACKER} names (written last, by rank 0, once every rank saved)"
    total_limit_rule = "--save-retain-interval N: each save deletes the previous iteration unless N divides it"

    def claims_path(self, path):
        name = os.path.basename(os.path.abspath(path))
        if not os.path.isdir(path) or not (NAME.fullmatch(name) or name == "release"):
            return False
        run_dir = os.path.dirname(os.path.abspath(os.path.normpath(path)))
        return _backend(path) or (  # or a save whose metadata.json was lost or damaged
            os.path.isfile(os.path.join(path, ".metadata")) and (os.path.isfile(os.path.join(path, COMMON)) or
                                                                 os.path.isfile(os.path.join(run_dir, TRACKER))))

    def interpret(self, ckpt):
        """The model's top-level modules (embedding, decoder, output_layer: the DCP keys are Megatron's sharded keys,
        with no `model.` head) become one `model` component under their full keys, as load_state_dict sees them."""
        heads = [c for c in ckpt.components if c.role == "extra" and c.name in MODEL_HEADS]
        if heads:
            model = Component("model", "model", heads[0].files, [dataclasses.replace(t, name=f"{c.name}.{t.name}")
                                                                 for c in heads for t in c.tensors])
            ckpt.components[:] = [model] + [c for c in ckpt.components if c not in heads]
        common = self._common(ckpt)
        if common is not None and "iteration" in common:
            iteration = common["iteration"]
            if type(iteration) is bool or (type(iteration) is int and 0 <= iteration < 1 << 63):
                ckpt.steps.append(StepSource("common.pt iteration", int(iteration), GLOBAL_STEP,
                                             record=Record.STATE_FILE, key="iteration", file=COMMON))
            else:
                ckpt.add_problem(Code.CORRUPT, ERROR, f"{COMMON} iteration is {str(iteration)[:40]!r}, not an "
                                 "iteration count: load_checkpoint cannot resume from it", os.path.join(ckpt.path,
                                                                                                       COMMON))
        super().interpret(ckpt)

    def _common(self, ckpt) -> dict | None:
        """common.pt read by the safe reader (its args Namespace as a plain dict): its counters and parts become
        the checkpoint's; None when there is none (core 0.19 keeps it as a DCP item) or it cannot be read."""
        from ckpttool.errors import CkptError
        from ckpttool.formats.torchfile import note_pickle, read_raw
        from ckpttool.formats.torchtree import plain

        full = os.path.join(ckpt.path, COMMON)
        if not os.path.isfile(full) or os.path.islink(full):
            return None
        ckpt.files.append(full)
        try:
            raw = read_raw(full)
        except CkptError as e:
            ckpt.add_problem(e.code, ERROR, f"{COMMON}: {e.reason}", full)
            return None
        note_pickle(ckpt, raw, full)
        common = plain(raw.obj)
        if not isinstance(common, dict):
            ckpt.add_problem(Code.CORRUPT, ERROR, f"{COMMON} holds no dict of the common state", full)
            return None
        args = common.get("args")
        args = args if isinstance(args, dict) else {}
        ckpt.metadata["megatron"] = {"iteration": common.get("iteration"),
                                     "checkpoint_version": common.get("checkpoint_version"),
                                     "parts": sorted(k for k in common if isinstance(k, str)),
                                     **{k: args.get(k) for k in LAYOUT_ARGS + ("no_save_optim", "no_save_rng")
                                        if k in args}}
        return common

    def completion_problems(self, ckpt):
        """metadata.json is written last (serialization.py save): without it dist_checkpointing.load raises "is not
        a distributed checkpoint"; up to core 0.18 common.pt holds the iteration and load_common raises without it."""
        problems = []
        folder = os.path.basename(os.path.abspath(ckpt.path))
        config = os.path.join(ckpt.path, CONFIG)
        if not os.path.isfile(config):
            problems.append(Problem(Code.MISSING_FILE, ERROR, f"{folder} has no {CONFIG}, which Megatron writes last, "
                                    "once the save is complete: dist_checkpointing.load raises 'not a distributed "
                                    "checkpoint'", config))
        elif not _backend(ckpt.path):
            ckpt.files.append(config)
            problems.append(Problem(Code.CORRUPT, ERROR, f"{CONFIG} names no sharded_backend: it was cut or "
                                    "overwritten, and dist_checkpointing.load raises 'not a distributed checkpoint'",
                                    config))
        else:
            ckpt.files.append(config)
        if "megatron" not in ckpt.metadata and not self._common_item(ckpt) and not any(
                p.path == os.path.join(ckpt.path, COMMON) for p in ckpt.problems):
            problems.append(Problem(Code.MISSING_FILE, ERROR, f"{folder} has no {COMMON} (nor a common_state item): "
                                    "the iteration, args and scheduler state are lost, and load_common raises "
                                    "'Common file ... does not exist'", os.path.join(ckpt.path, COMMON)))
        return problems

    @staticmethod
    def _common_item(ckpt) -> bool:
        return any(str(o).startswith("common_state/") for o in ckpt.metadata.get("objects", []))

    def own_latest(self, run_dir):
        return _named_save(run_dir, tracker_iteration(run_dir))

    def resume_problems(self, ckpt):
        """load_checkpoint (not --finetune): the iteration, the model, the optimizer and opt_param_scheduler
        (KeyError: "Specify --no-load-optim or --finetune"), the RNG state (sys.exit: "Specify --no-load-rng")
        unless the run saved without them (args no_save_optim, no_save_rng)."""
        problems = self.loader_problems(ckpt)
        meta = ckpt.metadata.get("megatron") or {}
        parts = set(meta.get("parts", ()))
        folder = os.path.basename(os.path.abspath(ckpt.path))
        roles = {c.role for c in ckpt.components}
        objects = [str(o) for o in ckpt.metadata.get("objects", [])]
        if meta and "iteration" not in parts and folder != "release":
            problems.append(Problem(Code.MISSING_FILE, ERROR, f"{COMMON} has no iteration: load_checkpoint prints "
                                    "'unable to load iteration' and exits", os.path.join(ckpt.path, COMMON)))
        if "model" not in roles:
            problems.append(Problem(Code.MISSING_FILE, ERROR, "no model tensors (embedding, decoder, output_layer): "
                                    "load_state_dict(strict=True) fails", ckpt.path))
        if not meta.get("no_save_optim"):
            if "optimizer" not in roles:
                problems.append(Problem(Code.MISSING_OPTIMIZER, ERROR, "no optimizer state: load_checkpoint raises "
                                        "KeyError ('Specify --no-load-optim or --finetune')", ckpt.path))
            if meta and "opt_param_scheduler" not in parts and "lr_scheduler" not in parts:
                problems.append(Problem(Code.MISSING_SCHEDULER, ERROR, f"{COMMON} has no opt_param_scheduler: "
                                        "load_checkpoint raises KeyError ('Specify --no-load-optim or --finetune')",
                                        os.path.join(ckpt.path, COMMON)))
        if not meta.get("no_save_rng") and not any(o.startswith("rng_state/") for o in objects):
            problems.append(Problem(Code.MISSING_RNG, ERROR, "no rng_state items: load_checkpoint prints 'Unable to "
                                    "load rng state ... Specify --no-load-rng or --finetune' and exits", ckpt.path))
        if os.path.isfile(os.path.join(ckpt.path, INTEGRITY)):
            problems += integrity_problems(ckpt.path)
        return problems + self._tracker_problems(ckpt, meta.get("iteration"))

    def _tracker_problems(self, ckpt, iteration) -> list[Problem]:
        """What the run's tracker makes of this checkpoint: Megatron resumes only from the iteration it names."""
        run_dir = os.path.dirname(os.path.abspath(os.path.normpath(ckpt.path)))
        tracker = os.path.join(run_dir, TRACKER)
        named = tracker_iteration(run_dir)
        fix = f"write {iteration} into it to resume from this save" if type(iteration) is int else "fix it"
        if named is None:
            what = "cannot be read as a file of the run (a link out of it, a directory or a FIFO)" if \
                os.path.lexists(tracker) else "is missing"
            return [Problem(Code.MISSING_FILE, WARNING, f"{TRACKER} {what}: Megatron's load_checkpoint finds no "
                            "checkpoint and starts from random ('will not load any checkpoints'); " + fix, tracker)]
        own = _named_save(run_dir, named)
        if own is not None and not os.path.isdir(own):
            return [Problem(Code.MISSING_FILE, WARNING, f"{TRACKER} names {named}, which is not in the run: "
                            "Megatron's resume fails to load it; " + fix, tracker)]
        if named == "":
            return [Problem(Code.CORRUPT, ERROR, f"{TRACKER} names no iteration: Megatron's read_metadata prints "
                            "'ERROR: Invalid metadata file' and exits with status 0, so the job ends as if it "
                            f"finished; write the iteration to resume from ({iteration}) into it", tracker)]
        if type(named) is int and type(iteration) is int and named < iteration < 1 << 63:
            return [Problem(Code.STEP_MISMATCH, WARNING, f"iteration {iteration} is newer than the {named} that "
                            f"{TRACKER} names: the job stopped before rank 0 wrote the tracker (written last), so "
                            f"Megatron resumes from iteration {named}; this save's files are all there (its "
                            f"{CONFIG} is written once it is complete): write {iteration} into {TRACKER} to resume "
                            "from it", tracker)]
        return []
