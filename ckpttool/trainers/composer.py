"""MosaicML Composer (composer/utils/checkpoint.py save_checkpoint, _save_checkpoint, load_checkpoint;
callbacks/checkpoint_saver.py; core/state.py State.state_dict; core/time.py Timestamp; trainer/trainer.py
_get_autoresume_checkpoint; read at 6405188, files written by mosaicml 0.32.1 on CPU).

A save is one `torch.save`d dict `{"state": State.state_dict(), "rng": [one RNG dict per rank]}`, written by rank 0
only, to `ep{epoch}-ba{batch}-rank{rank}.pt` (the timestamp when it was saved; written in place, no temp file), and
`latest-rank0.pt`, a relative symlink to it, is replaced after the file is complete. `state` holds `model`,
`optimizers` and `schedulers` (each `{class name: state_dict}`), `scaler`, `callbacks`, `timestamp`
(`{"Timestamp": {"batch": optimizer steps, "epoch", "sample", ...}}`), `rank_zero_seed`, `run_name`, `metadata`.
`save_weights_only` keeps only `model`, `integrations` and `metadata`, and no `rng`. Autoresume loads what
`latest-rank0.pt` points to and nothing else: no symlink, or one left dangling, and it starts from batch 0 without a
word (then `save_overwrite=False` stops the run on the files already there). `save_num_checkpoints_to_keep` deletes
only the saves of the running process, oldest first.
"""

from __future__ import annotations

import dataclasses
import os
import re

from ckpttool import paths
from ckpttool.formats.pickles import TORCH_WEIGHTS_ONLY, TensorRef
from ckpttool.model import (EPOCH, ERROR, GLOBAL_STEP, OPTIMIZER_UPDATES, SCHEDULER_STEPS, WARNING, Code, Component,
                            Problem, Record, StepSource)
from ckpttool.trainers import implications
from ckpttool.trainers.base import Profile, marker_text, moment_problems, weights_only_problem

NAME = re.compile(r"ep\d+-ba(\d+)-rank0\.pt")
LATEST = "latest-rank0.pt"
# checkpoint.py _COMPOSER_CHECKPOINT_SAFE_GLOBALS: load_checkpoint's torch.load(weights_only=True) runs under
# safe_globals of these (datetime.timedelta, numpy arrays and dtypes, TorchVersion), and refuses anything else with an
# Exception that says to set load_ignore_keys
SAFE = frozenset(TORCH_WEIGHTS_ONLY | {
    "datetime.timedelta", "torch.torch_version.TorchVersion", "numpy.ndarray", "numpy.dtype",
    "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "numpy._core.multiarray.scalar",
    "numpy.core.multiarray.scalar"} | {f"numpy.dtypes.{t}DType" for t in (
        "Bool", "Int8", "UInt8", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64", "Float16", "Float32",
        "Float64", "LongDouble", "Complex64", "Complex128", "Bytes", "Str", "Void", "Object", "Long", "ULong",
        "LongLong", "ULongLong", "Short", "UShort", "Byte", "UByte", "Int", "UInt", "Half", "Double")})
SOURCE = ("composer utils/checkpoint.py (_save_checkpoint, load_checkpoint, _COMPOSER_CHECKPOINT_SAFE_GLOBALS), "
          "callbacks/checkpoint_saver.py, core/state.py State.state_dict, trainer/trainer.py "
          "_get_autoresume_checkpoint")
# State.state_dict keys by role; `timestamp`, `rank_zero_seed`, `run_name`, `metadata` are read as counters or shown
STATE_ROLES = {"model": "model", "optimizers": "optimizer", "schedulers": "scheduler", "scaler": "scaler",
               "callbacks": "callbacks", "algorithms": "extra", "dataset_state": "dataloader"}
# composer/optim/decoupled_weight_decay.py sets initial_lr in every param group itself: no scheduler is implied
DECOUPLED = re.compile(r"Decoupled\w*")


def composer_state(ckpt) -> tuple[Component, dict, str] | None:
    """(the component holding Composer's `state` dict, that dict, the prefix its tensors' names carry), or None when
    the file is no Composer save: `state` with the model and Composer's `metadata` (composer_env_info)."""
    for comp in ckpt.components:
        tree = comp.tree if isinstance(comp.tree, dict) else {}
        state, prefix = (tree, "") if comp.name == "state" else (tree.get("state"), "state.")
        metadata = state.get("metadata") if isinstance(state, dict) else None
        if isinstance(metadata, dict) and "composer_env_info" in metadata and "model" in state:
            return comp, state, prefix
    return None


def _split(comp: Component, key: str, prefix: str, name: str, role: str, value) -> Component:
    """The part `key` of Composer's state as a component of its own, its tensors named as in `value`."""
    head = f"{prefix}{key}."
    tensors = [dataclasses.replace(t, name=t.name[len(head):]) for t in comp.tensors if t.name.startswith(head)]
    uncarried = [(n[len(head):], layout) for n, layout in comp.uncarried if n.startswith(head)]
    return Component(name, role, files=list(comp.files), tensors=tensors, tree=value,
                     pickle_globals=comp.pickle_globals, uncarried=uncarried)


def timestamp_counters(state: dict, record: Record, file: str | None = None) -> list[StepSource]:
    """The timestamp's batch (optimizer steps: Composer steps once per batch) and epoch, read from `record`."""
    timestamp = state.get("timestamp")
    timestamp = timestamp.get("Timestamp") if isinstance(timestamp, dict) else None
    found = []
    for key, meaning in (("batch", GLOBAL_STEP), ("epoch", EPOCH)):
        value = timestamp.get(key) if isinstance(timestamp, dict) else None
        if type(value) is int:
            found.append(StepSource(f"state.timestamp {key}", value, meaning, record=record,
                                    key=f"state.timestamp.Timestamp.{key}", file=file))
    return found


def _optimizer_step(comp: Component) -> int | None:
    """The largest per-parameter `step` of an optimizer component (Adam's; SGD keeps none), its tensor steps read
    by the names the component gave them."""
    from ckpttool.formats.torchtree import largest_step, read_scalar

    by_name = {t.name: t for t in comp.tensors}
    return largest_step(comp.tree, lambda index, _ref: read_scalar(by_name[f"state.{index}.step"])
                        if f"state.{index}.step" in by_name else None)


MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")  # each in its parameter's shape
NAMED = 5  # parameters named in one problem


def _parameter_problems(ckpt) -> list[Problem]:
    """Composer keys each optimizer's state and param groups by parameter name (State.state_dict's
    get_optimizer_state_dict): state for a parameter the model does not hold, a moment in another shape than its
    parameter, or a parameter missing a moment every other one has fails the optimizer's load (load_state_dict,
    dcp.load into the live shapes) or its first step. Optimizers keyed by index (older saves) are left to the
    generic moment check."""
    model = next((c for c in ckpt.components if c.role == "model"), None)
    shapes = {t.name: tuple(t.shape) for t in model.tensors} if model else {}
    problems = []
    for part in ckpt.components:
        if part.role != "optimizer" or not shapes:
            continue
        stats: dict[str, dict[str, tuple]] = {}
        for t in part.tensors:
            param, _, stat = t.name.removeprefix("state.").rpartition(".")
            if t.name.startswith("state.") and stat in MOMENTS:
                stats.setdefault(param, {})[stat] = tuple(t.shape)
        groups = part.tree.get("param_groups") if isinstance(part.tree, dict) else None
        named = [p for g in groups if isinstance(g, dict) and isinstance(g.get("params"), list)
                 for p in g["params"] if isinstance(p, str)] if isinstance(groups, list) else []
        if not any(p in shapes for p in list(stats) + named):
            continue  # keyed by index
        where = part.files[0] if part.files else ckpt.path
        if lost := sorted({p for p in list(stats) + named if p not in shapes}):
            problems.append(Problem(Code.OPTIMIZER_MISMATCH, ERROR, f"{part.name} names {', '.join(lost[:NAMED])}"
                                    f"{' and more' if len(lost) > NAMED else ''}, which the model does not hold: "
                                    "the optimizer's load fails", where, component=part.name))
        wrong = [f"{stat} of {p} is {list(shape)}, the parameter {list(shapes[p])}" for p, moments in stats.items()
                 if p in shapes for stat, shape in moments.items() if shape != shapes[p]]
        if wrong:
            problems.append(Problem(Code.OPTIMIZER_MISMATCH, ERROR, f"{part.name}: {'; '.join(wrong[:NAMED])}: "
                                    "moments swapped or from another model, the load or the first step fails",
                                    where, component=part.name))
        every = set().union(*stats.values()) if stats else set()
        cut = [f"{p} lacks {', '.join(sorted(every - set(m)))}" for p, m in stats.items() if set(m) != every]
        if cut:
            problems.append(Problem(Code.OPTIMIZER_MISMATCH, ERROR, f"{part.name}: {'; '.join(cut[:NAMED])}, which "
                                    "the other parameters' state holds: its state was cut, the load fails", where,
                                    component=part.name))
    return problems


class Composer(Profile):
    name = "composer"
    layout = "Composer ep{E}-ba{B}-rank0.pt"
    source = SOURCE
    name_pattern = NAME
    needs_scheduler = False  # `schedulers` is {} when the run has none; every scheduler Composer steps is saved
    scheduler_rule = "after each batch (step_schedulers_every_batch, the default), or after each epoch"
    scheduler_may_step_per_epoch = True
    weights_only_loads = ((r".*\.pt", SAFE, True),)
    latest_rule = f"autoresume: the file {LATEST} links to, and nothing else (no link: it starts from batch 0)"
    total_limit_rule = ("save_num_checkpoints_to_keep=k deletes this process's saves beyond the newest k (the saves "
                        "of an earlier process stay)")
    lost_pick_outcome = ("autoresume finds no checkpoint and starts from batch 0, then save_overwrite=False stops the "
                         "run with FileExistsError on the saves already there")

    def claims(self, ckpt):
        return ckpt.format == "torch" and composer_state(ckpt) is not None

    def interpret(self, ckpt):
        comp, state, prefix = composer_state(ckpt)
        parts = []
        for key, role in STATE_ROLES.items():
            value = state.get(key)
            if role in ("optimizer", "scheduler") and isinstance(value, dict):  # {class name: state_dict}
                for cls, v in value.items():
                    if isinstance(v, dict):
                        parts.append(_split(comp, f"{key}.{cls}", prefix, role if len(value) == 1 else
                                            f"{role}.{cls}", role, v))
                        parts[-1].metadata["class"] = str(cls)
            elif value is not None and (role == "model" or value):
                parts.append(_split(comp, key, prefix, key, role, value))
        ckpt.components[ckpt.components.index(comp):ckpt.components.index(comp) + 1] = parts
        ckpt.metadata["top_level_keys"] = sorted(set(ckpt.metadata.get("top_level_keys", [])) | {"state"})
        ckpt.metadata["composer_state_keys"] = sorted(map(str, state))
        self._counters(ckpt, state, parts)
        if isinstance(state.get("metadata"), dict) and type(state["metadata"].get("world_size")) is int:
            ckpt.metadata["world_size"] = state["metadata"]["world_size"]
        ckpt.problems.extend(self._state_problems(ckpt, state))
        super().interpret(ckpt)

    def _counters(self, ckpt, state: dict, parts: list[Component]):
        """The timestamp's batch (optimizer steps: Composer steps once per batch) and epoch; each optimizer's step
        and each scheduler's last_epoch."""
        base = os.path.basename(ckpt.path)
        ckpt.steps.extend(timestamp_counters(state, Record.TRAINING_DICT, base))
        for part in parts:
            if part.role == "optimizer" and (step := _optimizer_step(part)) is not None:
                ckpt.steps.append(StepSource(f"{part.name} state step", step, OPTIMIZER_UPDATES,
                                             record=Record.OPTIMIZER, key=f"{part.name}.step", file=base))
            elif part.role == "scheduler" and type(part.tree.get("last_epoch")) is int:
                ckpt.steps.append(StepSource(f"{part.name} last_epoch", part.tree["last_epoch"], SCHEDULER_STEPS,
                                             record=Record.SCHEDULER, key=f"{part.name}.last_epoch", file=base))

    @staticmethod
    def _state_problems(ckpt, state: dict) -> list[Problem]:
        """What Composer's load_checkpoint would fail on or silently drop: a model that is no state dict of tensors
        (it loads non-strictly: an empty one resumes with fresh weights), a timestamp that is no
        {"Timestamp": {counters}}, optimizers that are no {class: state_dict}."""
        problems = []
        model = next((c for c in ckpt.components if c.role == "model"), None)
        if not isinstance(state.get("model"), dict) or model is None or not model.tensors:
            problems.append(Problem(Code.MISSING_FILE, ERROR, "state.model holds no model weights: Composer's load "
                                    "(load_strict_model_weights=False by default) fails or resumes with fresh "
                                    "weights", ckpt.path, component="model"))
        if "optimizers" not in state:
            return problems  # save_weights_only: resume_problems says it
        timestamp = state.get("timestamp")
        inner = timestamp.get("Timestamp") if isinstance(timestamp, dict) else None
        batch = inner.get("batch") if isinstance(inner, dict) else None
        if not (type(batch) is int and 0 <= batch < 1 << 63):
            problems.append(Problem(Code.CORRUPT, ERROR, f"state.timestamp holds no batch count "
                                    f"({str(batch if inner is not None else timestamp)[:40]!r}): Timestamp."
                                    "load_state_dict fails or resumes at another batch", ckpt.path))
        optimizers = state.get("optimizers")
        if not isinstance(optimizers, dict) or not all(
                isinstance(v, dict) and isinstance(v.get("state"), dict) and isinstance(v.get("param_groups"), list)
                and v["param_groups"] for v in optimizers.values()):
            problems.append(Problem(Code.CORRUPT, ERROR, "state.optimizers is no {class name: optimizer state_dict} "
                                    "with param groups: the optimizer's load_state_dict fails", ckpt.path,
                                    component="optimizer"))
        elif type(batch) is int and batch > 0:
            empty = [str(k) for k, v in optimizers.items() if "Adam" in str(k) and not v["state"]]
            if empty:
                problems.append(Problem(Code.MISSING_OPTIMIZER, ERROR, f"{', '.join(empty)} holds no per-parameter "
                                        f"state at batch {batch}: the resume restarts its moments and step from "
                                        "zero", ckpt.path, component="optimizer"))
        return problems + _parameter_problems(ckpt)

    def run_saves(self, path):
        folder = os.path.dirname(os.path.abspath(path))
        try:
            entries = os.listdir(folder)
        except OSError:
            return {}
        return {int(m.group(1)): os.path.join(folder, e) for e in entries if (m := NAME.fullmatch(e))}

    def own_latest(self, run_dir):
        """The save latest-rank0.pt links to (or, downloaded from an object store, the save its
        `latest-rank0.pt.symlink` pointer names); the link itself where there is none to follow (autoresume then
        finds nothing: `lost_pick_outcome`)."""
        link = os.path.join(run_dir, LATEST)
        if os.path.islink(link):
            return os.path.normpath(os.path.join(run_dir, os.readlink(link)))
        pointer = marker_text(run_dir, LATEST + ".symlink", 4096)  # an object store's pointer, downloaded beside
        name = os.path.basename(pointer.strip().rstrip("/")) if pointer else ""  # create_symlink_file: its name
        return os.path.join(run_dir, name) if paths.plain_name(name) else link

    def resume_problems(self, ckpt):
        """Composer's resume of a full save: model, optimizers, schedulers, timestamp and RNG, loaded as its
        weights_only load allows; a weights-only save (`save_weights_only`) is no resume point."""
        roles = {c.role for c in ckpt.components}
        if "optimizer" not in roles:
            return [weights_only_problem(ckpt)]
        coupled = dataclasses.replace(ckpt, components=[c for c in ckpt.components if not (
            c.role == "optimizer" and DECOUPLED.fullmatch(c.metadata.get("class", "")))])
        problems = self.loader_problems(ckpt) + moment_problems(ckpt)
        problems += implications.scheduler_problems(coupled, always_saved=False, lost_reported=False)
        if "rng" not in roles:
            problems.append(Problem(Code.MISSING_RNG, WARNING, "no rng: Composer's resume keeps the fresh RNG state "
                                    "(data order and dropout differ from an uninterrupted run)", ckpt.path))
        return problems



SHARDED_NAME = re.compile(r"ep\d+-ba(\d+)")  # FSDPConfig.sharded_ckpt_prefix_dir's default, 'ep{epoch}-ba{batch}'
ENV_INFO = "state.metadata.composer_env_info."
MAX_DEPTH = 32  # levels of one flattened name that are rebuilt; a deeper one is no key of Composer's
NAMED_BY_PARAMETER = ("model", "state")


def _unflatten(flat: dict):
    """DCP's flattened names (`a.b.0.c`: one segment per dict key, and per index of a list of containers) as nested
    dicts and lists again. A key that holds dots (a parameter's name) comes back as several levels: only the levels
    of Composer's own keys are read from the result."""
    tree: dict = {}
    for name, value in flat.items():
        *heads, last = name.split(".")
        if len(heads) > MAX_DEPTH:
            continue
        node = tree
        for head in heads:
            node = node.setdefault(head, {})
            if not isinstance(node, dict):  # a leaf and a branch under one name (a hostile file): the leaf stays
                break
        else:
            node.setdefault(last, value)
    return _as_lists(tree)


def _as_lists(node, key=None):
    """Dicts keyed 0..n-1 as the lists DCP flattened, but for those keyed by parameter names (`model`, an
    optimizer's `state`: an nn.Sequential's parameters are named 0.weight, 1.weight, ...)."""
    if not isinstance(node, dict):
        return node
    node = {k: _as_lists(v, k) for k, v in node.items()}
    if key not in NAMED_BY_PARAMETER and node and node.keys() == {str(i) for i in range(len(node))}:
        return [node[str(i)] for i in range(len(node))]
    return node


def _slot(t) -> TensorRef:
    """A tensor's place in a rebuilt tree (what `convert` fills with its data, by the tree's dotted names)."""
    return TensorRef(None, 0, tuple(t.shape), (), t.dtype)


def sharded_state(ckpt) -> Component | None:
    """A sharded save's `state` as one component, the shape composer_state reads a monolithic save in: its tensors
    named below `state.` (the DCP reader split them by their top-level name, or left them whole) and its tree rebuilt
    from the DCP items, with each optimizer's per-parameter state named from its tensors. None when it is no
    Composer save (no `state.metadata.composer_env_info` item)."""
    objects = {k: v for k, v in (ckpt.metadata.get("objects") or {}).items() if isinstance(k, str)}
    if not any(k.startswith(ENV_INFO) for k in objects):
        return None
    tensors = []
    for comp in ckpt.components:
        for t in comp.tensors:
            name = f"{comp.name}.{t.name}" if comp.name in ("state", "rng") else t.name
            if name.startswith("state."):
                tensors.append(dataclasses.replace(t, name=name[len("state."):]))
    tree = _unflatten({k[len("state."):]: v for k, v in objects.items() if k.startswith("state.")})
    model = tree.setdefault("model", {})
    optimizers = tree.get("optimizers")
    for v in optimizers.values() if isinstance(optimizers, dict) else ():
        if isinstance(v, dict):
            v.setdefault("state", {})
    for t in tensors:  # each tensor in its place: the tree is Composer's State.state_dict again
        cls, _, rest = t.name.removeprefix("optimizers.").partition(".state.")
        if t.name.startswith("model.") and isinstance(model, dict):
            model[t.name[len("model."):]] = _slot(t)
        elif t.name.startswith("optimizers.") and rest and isinstance(optimizers, dict) and \
                isinstance(optimizers.get(cls), dict) and isinstance(optimizers[cls]["state"], dict):
            param, _, stat = rest.rpartition(".")
            entry = optimizers[cls]["state"].setdefault(param, {})
            if isinstance(entry, dict):
                entry[stat] = _slot(t)
    files = next((c.files for c in ckpt.components if c.files), [])
    return Component("state", "extra", files=list(files), tensors=tensors, tree=tree)


class ComposerSharded(Composer):
    """FSDP with `state_dict_type='sharded'`: every rank writes its shards of `{"state": State.state_dict(), "rng":
    [...]}` with torch.distributed.checkpoint into `ep{epoch}-ba{batch}/` (`__{rank}_0.distcp` each, `.metadata` last,
    by rank 0), and rank 0 points `latest-rank0.pt` at the dir once all are written (checkpoint.py
    get_save_filename, _save_checkpoint; checkpoint_saver.py). load_sharded_checkpoint reads it with dist_cp.load
    (its items unpickled by torch.load(weights_only=False), under any world size: DCP reshards)."""

    layout = "Composer sharded ep{E}-ba{B}/ (DCP)"
    source = SOURCE.replace("load_checkpoint,", "load_checkpoint, load_sharded_checkpoint,")
    name_pattern = SHARDED_NAME
    weights_only_loads = ()
    run_saves = Profile.run_saves  # the run's other ep{E}-ba{B} dirs

    def claims_path(self, path):
        """An `ep{E}-ba{B}` dir of DCP files; its items confirm it is Composer's."""
        from ckpttool.formats import dcp

        return bool(SHARDED_NAME.fullmatch(os.path.basename(os.path.abspath(path)))) and dcp.detect(path)

    def claims(self, ckpt):
        return ckpt.format == "dcp" and sharded_state(ckpt) is not None

    def confirms(self, ckpt):
        """Its Composer items; or nothing read at all (a save cut before its `.metadata`: the reader says so)."""
        return self.claims(ckpt) or not ckpt.components

    def interpret(self, ckpt):
        state = sharded_state(ckpt)
        if state is None:  # unfinished: its name is all there is
            Profile.interpret(self, ckpt)
            return
        ckpt.components[:] = [state] + [c for c in ckpt.components if c.name == "rng"]
        # the reader read every `step`/`epoch` item as a counter: the timestamp's are read by meaning below
        ckpt.steps[:] = [s for s in ckpt.steps if not s.key.startswith("state.timestamp.")]
        super().interpret(ckpt)

    def resume_problems(self, ckpt):
        return super().resume_problems(ckpt) if ckpt.components else []  # unfinished: the reader's error says it

    def _counters(self, ckpt, state, parts):
        """The timestamp's batch and epoch; the reader read the optimizers' steps (from every rank's data file) and
        the schedulers' last_epoch."""
        ckpt.steps.extend(timestamp_counters(state, Record.DCP_STATE))
