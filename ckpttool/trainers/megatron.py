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
from ckpttool.formats.statedir import role
from ckpttool.trainers.base import Profile, marker_text

NAME = re.compile(r"iter_(\d{7,})")
TRACKER = "latest_checkpointed_iteration.txt"
CONFIG, COMMON, INTEGRITY = "metadata.json", "common.pt", "integrity.json"
NON_PERSISTENT = "non_persistent"  # _NON_PERSISTENT_CKPT_SUBDIR
SMALL = 1 << 20  # the tracker holds a number, metadata.json a few backend names: a longer one is damage
SOURCE = ("Megatron-LM megatron/training/checkpointing.py (save_checkpoint, load_checkpoint, read_metadata, "
          "get_checkpoint_name, generate_state_dict), megatron-core 0.16.1 dist_checkpointing (serialization.py save/"
          "load, strategies/common.py save_common, strategies/torch.py, mapping.py ShardedObject.unique_key)")
MODEL_HEADS = ("embedding", "decoder", "encoder", "output_layer", "pooler", "lm_head", "model")
# args the checkpoint was saved with that say how it was split (check_checkpoint_args, the (TP, PP) comparison in
# load_checkpoint) and what it chose not to save
LAYOUT_ARGS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
               "context_parallel_size", "world_size", "data_parallel_size", "use_distributed_optimizer")


def run_state(state: dict) -> dict:
    """What a saved state dict (common.pt, a legacy rank file) says of the run: its iteration, checkpoint version,
    parts, and the args that say how it was split and what it chose not to save (args is an argparse.Namespace,
    unpickled as a stand-in whose fields are read; a dict in other versions)."""
    from ckpttool.formats.pickles import Opaque
    from ckpttool.formats.torchtree import plain

    args = state.get("args")
    args = args.fields() if isinstance(args, Opaque) else args if isinstance(args, dict) else {}
    return {"iteration": plain(state.get("iteration")), "checkpoint_version": plain(state.get("checkpoint_version")),
            "parts": sorted(k for k in state if isinstance(k, str)),
            **{k: plain(args[k]) for k in LAYOUT_ARGS + ("no_save_optim", "no_save_rng") if k in args}}


def tracker_iteration(run_dir: str) -> int | str | None:
    """What the run's tracker names: an iteration, "release", "" when it holds anything else (read_metadata then
    prints "ERROR: Invalid metadata file" and exits), or None when there is no tracker."""
    text = marker_text(run_dir, TRACKER, SMALL)
    if text is None:
        return None
    text = text.strip()
    if text == "release":
        return text
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 19 else ""  # an int64, as Megatron's


def _named_save(run_dir: str, named: int | str | None) -> str | None:
    """The save dir a tracker value names (get_checkpoint_name); None for no tracker or an unreadable one."""
    if named is None or named == "":
        return None
    return os.path.join(run_dir, "release" if named == "release" else f"iter_{named:07d}")


def has_dist_config(path: str) -> bool:
    """Whether metadata.json is the CheckpointingConfig dist_checkpointing writes (check_is_distributed_checkpoint)."""
    try:
        config = json.loads(marker_text(path, CONFIG, SMALL) or "null")
    except (ValueError, RecursionError):
        return False
    return isinstance(config, dict) and "sharded_backend" in config


MAX_UNLISTED = 10_000  # entries of a save looked at for files its integrity.json does not list


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
    # save_integrity_manifest lists every top-level file: one it does not list came after it (or the list was cut)
    for entry in sorted(os.listdir(path))[:MAX_UNLISTED]:
        full = os.path.join(path, entry)
        if entry not in files and entry != INTEGRITY and not entry.startswith("ckpttool") and \
                os.path.isfile(full) and not os.path.islink(full):
            problems.append(Problem(Code.CHECKSUM_MISMATCH, WARNING, f"{entry} is not listed in {INTEGRITY}, which "
                                    "Megatron writes over every file of the save: it was added after", full))
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
        return has_dist_config(path) or (  # or a save whose metadata.json was lost or damaged
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
        where = COMMON if os.path.isfile(os.path.join(ckpt.path, COMMON)) else "the common_state item"
        if common is not None and "iteration" in common:
            iteration = common["iteration"]
            if type(iteration) is bool or (type(iteration) is int and 0 <= iteration < 1 << 63):
                ckpt.steps.append(StepSource(f"{where} iteration", int(iteration), GLOBAL_STEP,
                                             record=Record.STATE_FILE, key="iteration", file=where))
            else:
                ckpt.add_problem(Code.CORRUPT, ERROR, f"{where} iteration is {str(iteration)[:40]!r}, not an "
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
            return self._common_state_item(ckpt)
        ckpt.files.append(full)
        try:
            raw = read_raw(full)
        except CkptError as e:
            ckpt.add_problem(e.code, ERROR, f"{COMMON}: {e.reason}", full)
            return None
        note_pickle(ckpt, raw, full)
        if not isinstance(raw.obj, dict):
            ckpt.add_problem(Code.CORRUPT, ERROR, f"{COMMON} holds no dict of the common state", full)
            return None
        common = {k: plain(v) for k, v in raw.obj.items() if k != "args"}
        ckpt.metadata["megatron"] = run_state(raw.obj)
        content = common.get("content_metadata")
        if isinstance(content, dict) and "distrib_optim_sharding_type" in content:
            ckpt.metadata["megatron"]["distrib_optim_sharding_type"] = content["distrib_optim_sharding_type"]
        return common

    @staticmethod
    def _common_state_item(ckpt) -> dict | None:
        """Core 0.19+ (serialization.py save: ShardedObject("common_state"), load_common_state_dict) keeps the common
        state as one DCP item instead of common.pt; the DCP reader shows it (its args by class name only)."""
        item = next((v for k, v in (ckpt.metadata.get("objects") or {}).items()
                     if str(k).startswith("common_state/")), None)
        item = item[0] if isinstance(item, list) and item else item  # load_common_state_dict returns loaded[0]
        if not isinstance(item, dict):
            return None
        ckpt.metadata["megatron"] = run_state(item)
        return item

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
        elif not has_dist_config(ckpt.path):
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
        if not os.path.isfile(os.path.join(ckpt.path, INTEGRITY)) and (sibling := self._sealed_sibling(ckpt.path)):
            problems.append(Problem(Code.MISSING_FILE, ERROR, f"{folder} has no {INTEGRITY}, which the run's save "
                                    f"{os.path.basename(sibling)} has (--verify-integrity writes it after "
                                    f"{CONFIG}): this save stopped before it or lost it, and a load with "
                                    "--verify-integrity raises 'Integrity manifest not found'",
                                    os.path.join(ckpt.path, INTEGRITY)))
        return problems

    def _sealed_sibling(self, path: str) -> str | None:
        """The run's save nearest `path` by iteration, where it holds an integrity.json (the run saves with
        --verify-integrity)."""
        saves = self.run_saves(path)
        number = self.name_number(path)
        nearest = sorted((n for n in saves if n != number), key=lambda n: abs(n - (number or 0)))[:1]
        return next((saves[n] for n in nearest if os.path.isfile(os.path.join(saves[n], INTEGRITY))), None)

    @staticmethod
    def _common_item(ckpt) -> bool:
        return any(str(o).startswith("common_state/") for o in ckpt.metadata.get("objects", []))

    def own_latest(self, run_dir):
        """The iteration the tracker names; a newer or equal one in `non_persistent/` (--non-persistent-ckpt-type
        global, its own tracker) wins (_load_base_checkpoint reads it first)."""
        named = tracker_iteration(run_dir)
        transient = os.path.join(run_dir, NON_PERSISTENT)
        other = tracker_iteration(transient) if os.path.isdir(transient) and not os.path.islink(transient) else None
        if type(other) is int and (named is None or (type(named) is int and other >= named)):
            return _named_save(transient, other)
        return _named_save(run_dir, named)

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
        return problems + self._tracker_problems(ckpt, meta.get("iteration"))

    def own_manifest(self, ckpt):
        """integrity.json (`--verify-integrity`)."""
        return (INTEGRITY, integrity_problems(ckpt.path)) if os.path.isfile(os.path.join(ckpt.path, INTEGRITY)) \
            else None

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


RANK_DIR = re.compile(r"mp_rank_(\d\d)(?:_(\d{3}))?(?:_(\d{3}))?")
RANK_FILE, DISTRIB_OPTIM = "model_optim_rng.pt", "distrib_optim.pt"
MAX_MISSING_RANKS = 64  # rank files the args may imply beyond those present before the gap is named, not listed
LEGACY_SOURCE = ("Megatron-LM megatron/training/checkpointing.py (get_checkpoint_name, save_checkpoint, "
                 "generate_state_dict, _load_base_checkpoint, check_checkpoint_args, "
                 "get_distributed_optimizer_checkpoint_name; --ckpt-format torch)")


def rank_dirs(path: str) -> list[str]:
    """The `mp_rank_XX[_YYY][_ZZZ]` folders of a legacy save (tensor, pipeline and expert rank)."""
    try:
        return sorted(e for e in os.listdir(path) if RANK_DIR.fullmatch(e) and os.path.isdir(os.path.join(path, e)))
    except OSError:
        return []


class MegatronLegacy(Megatron):
    """`--ckpt-format torch`: `iter_N/mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]/model_optim_rng.pt`, one torch.save of
    the whole state dict (args, iteration, model, optimizer, opt_param_scheduler, rng_state) per model-parallel rank
    of data-parallel rank 0, and `distrib_optim.pt` beside it with --use-distributed-optimizer. load_checkpoint opens
    the file of its own ranks and asserts (check_checkpoint_args) that the tensor and pipeline sizes it was saved with
    are the live ones; the shards are not resharded, and their split axis is not saved, so convert takes one rank."""

    layout = "Megatron legacy iter_N/mp_rank_XX"
    source = LEGACY_SOURCE
    counter_meanings = ((Record.TRAINING_DICT, "iteration", GLOBAL_STEP),)
    file_roles = (role(r"mp_rank_(\d\d(?:_\d{3}){0,2})/model_optim_rng\.pt", "model", "mp_rank_{n}"),
                  role(r"mp_rank_(\d\d(?:_\d{3}){0,2})/distrib_optim\.pt", "optimizer", "distrib_optim_{n}"))

    def claims_path(self, path):
        name = os.path.basename(os.path.abspath(path))
        return os.path.isdir(path) and bool(NAME.fullmatch(name) or name == "release") and bool(rank_dirs(path))

    def interpret(self, ckpt):
        """Each rank's parts named after its folder where there are several (they are shards of one model, not one
        model), and the run's args and counters from the first rank's file."""
        ranks = rank_dirs(ckpt.path)
        if len(ranks) > 1:
            for comp in ckpt.components:
                folder = os.path.basename(os.path.dirname(comp.files[0])) if comp.files else ""
                if RANK_DIR.fullmatch(folder) and not comp.name.endswith(folder):
                    comp.name = f"{comp.name}.{folder}"
        first = os.path.join(ckpt.path, ranks[0], RANK_FILE) if ranks else None
        if first and os.path.isfile(first):
            self._rank_state(ckpt, first)
        Profile.interpret(self, ckpt)

    def _rank_state(self, ckpt, path: str):
        """args (the Namespace's fields), the iteration and which parts the first rank's file holds."""
        from ckpttool.errors import CkptError
        from ckpttool.formats.torchfile import read_raw

        try:
            obj = read_raw(path).obj
        except CkptError:
            return  # the reader reported it
        if not isinstance(obj, dict):
            return
        ckpt.metadata["megatron_legacy"] = True
        ckpt.metadata["megatron"] = run_state(obj)

    def completion_problems(self, ckpt):
        """No marker: each rank's file is written whole by torch.save; the tracker (written last) says the rest."""
        return []

    def resume_problems(self, ckpt):
        """Every model-parallel rank's file (tensor x pipeline x expert sizes the args say), and in each the
        iteration, model, optimizer and opt_param_scheduler (unless --no-save-optim), rng_state (unless
        --no-save-rng), and distrib_optim.pt with the distributed optimizer: each rank loads its own file."""
        problems = self.loader_problems(ckpt)
        meta = ckpt.metadata.get("megatron") or {}
        ranks = rank_dirs(ckpt.path)
        sizes = [meta.get(k) for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                                       "expert_model_parallel_size")]
        tp, pp, ep = (s if type(s) is int and s > 0 else 1 for s in sizes)
        if tp * pp * ep > len(ranks) + MAX_MISSING_RANKS:  # never enumerated: a hostile args could say 2^32 ranks
            return problems + [Problem(Code.MISSING_FILE, ERROR, f"the args say tensor-parallel {tp}, pipeline-"
                                       f"parallel {pp}, expert-parallel {ep}: {tp * pp * ep} rank files, and "
                                       f"{len(ranks)} are here", ckpt.path)]
        expected = [f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "") + (f"_{e:03d}" if ep > 1 else "")
                    for t in range(tp) for p in range(pp) for e in range(ep)]
        for folder in sorted(set(expected if meta else []) | set(ranks)):
            problems += self._rank_problems(ckpt, folder, meta, tp, pp)
        return problems + self._tracker_problems(ckpt, meta.get("iteration"))

    def _rank_problems(self, ckpt, folder: str, meta: dict, tp: int, pp: int) -> list[Problem]:
        """One rank's file: there, a dict, and holding what that rank's load_checkpoint reads."""
        from ckpttool.errors import CkptError
        from ckpttool.formats.torchfile import read_raw

        path = os.path.join(ckpt.path, folder, RANK_FILE)
        if not os.path.isfile(path) or os.path.islink(path):
            return [Problem(Code.MISSING_FILE, ERROR, f"{folder}/{RANK_FILE} is missing (saved with tensor-parallel "
                            f"{tp}, pipeline-parallel {pp}): that rank's load_checkpoint finds no checkpoint", path)]
        try:
            obj = read_raw(path).obj
        except CkptError:
            return []  # the reader reported it
        if not isinstance(obj, dict):
            return [Problem(Code.CORRUPT, ERROR, f"{folder}/{RANK_FILE} holds no state dict", path)]
        state = run_state(obj)
        parts, problems = set(state["parts"]), []
        iteration = obj.get("iteration")
        if "iteration" not in parts and os.path.basename(os.path.abspath(ckpt.path)) != "release":
            problems.append(Problem(Code.MISSING_FILE, ERROR, f"{folder}/{RANK_FILE} has no iteration: "
                                    "load_checkpoint prints 'unable to load iteration' and exits", path))
        elif "iteration" in parts and not (type(iteration) is int and 0 <= iteration < 1 << 63):
            problems.append(Problem(Code.CORRUPT, ERROR, f"{folder}/{RANK_FILE} iteration is "
                                    f"{str(iteration)[:40]!r}, not an iteration count", path))
        lost = [k for k in ("model",) if k not in parts and not any(p.startswith("model") for p in parts)]
        if not meta.get("no_save_optim"):
            lost += [k for k in ("optimizer", "opt_param_scheduler") if k not in parts]
        if not meta.get("no_save_rng"):
            lost += [k for k in ("rng_state",) if k not in parts]
        codes = {"optimizer": Code.MISSING_OPTIMIZER, "opt_param_scheduler": Code.MISSING_SCHEDULER,
                 "rng_state": Code.MISSING_RNG}
        for key in lost:
            problems.append(Problem(codes.get(key, Code.MISSING_FILE), ERROR, f"{folder}/{RANK_FILE} has no {key}: "
                                    "that rank's load_checkpoint fails (KeyError, or 'Specify --no-load-optim / "
                                    "--no-load-rng or --finetune')", path))
        if meta.get("use_distributed_optimizer") and not meta.get("no_save_optim") and not os.path.isfile(
                os.path.join(ckpt.path, folder, DISTRIB_OPTIM)):
            problems.append(Problem(Code.MISSING_OPTIMIZER, ERROR, f"{folder}/{DISTRIB_OPTIM} is missing: the "
                                    "distributed optimizer's load_parameter_state cannot restore its state",
                                    os.path.join(ckpt.path, folder, DISTRIB_OPTIM)))
        return problems

