"""DeepSpeed engine checkpoints (`engine.save_checkpoint(save_dir)`): `save_dir/latest` names the tag dir
`global_step{N}/`, which holds the model states (`mp_rank_00_model_states.pt`; under ZeRO-3 one
`zero_pp_rank_{r}_mp_rank_00_model_states.pt` per rank) and, under ZeRO, one `[bf16_]zero_pp_rank_{r}_mp_rank_00_
optim_states.pt` per data-parallel rank holding that rank's slice of the fp32 master weights and of the optimizer state.

Read from deepspeed/runtime/engine.py (`save_checkpoint`, `_save_checkpoint`, `_get_zero_ckpt_name`) and the
`zero_to_fp32.py` it copies next to every save, whose rules the consolidated model follows exactly:

- ZeRO-1/2: each param group's master weights are the ranks' `single_partition_of_fp32_groups[g]` concatenated (the
  last rank's without padding); parameters lie in `param_shapes[g]` order, each followed by its
  `param_alignment_paddings` entry when saved.
- ZeRO-3: every parameter is split into `ceil(numel / world)` elements per rank; rank r's `fp32_flat_groups` hold
  its pieces back to back, parameter after parameter, and the first `numel` elements of the pieces in rank order are
  the parameter.
- Buffers (`buffer_names`) come from the model states' `module`, frozen parameters from `frozen_param_fragments`
  (whole under ZeRO-1/2, one piece per rank under ZeRO-3), tied ones from `shared_params`.

The consolidated weights are the `model` component: each parameter is a tensor made of flat chunks that point into
the rank files, read one tensor at a time (ckpttool.tensors). Nothing is unpickled by torch.
"""

from __future__ import annotations

import math
import os
import re

from ckpttool import paths
from ckpttool.errors import CkptError
from ckpttool.formats import torchfile, torchtree
from ckpttool.formats.pickles import SAFE_GLOBALS, Opaque, TensorRef
from ckpttool.model import (ERROR, OPTIMIZER_UPDATES, Checkpoint, Chunk, Code, Component, Location, Record, StepSource,
                            TensorInfo)

LATEST = "latest"
MAX_WORLD = 1 << 20  # ranks; a partition_count beyond it is damage, not a run
MODEL_STATES = re.compile(r"(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt")
OPTIM_STATES = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")
# Records DeepSpeed's optimizer pickles into its own files: an Enum, a dataclass and loss-scaler state, built without
# running code (NEWOBJ/BUILD or an Enum lookup). DeepSpeed itself loads them with torch.load(weights_only=False).
DEEPSPEED_GLOBALS = SAFE_GLOBALS | {
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
}


def tag_dir(path: str) -> str | None:
    """The tag dir a path means: itself when it holds model states, else the one its `latest` file names."""
    if not os.path.isdir(path):
        return None
    if any(MODEL_STATES.fullmatch(e) for e in os.listdir(path)):
        return path
    if paths.special(os.path.join(path, LATEST)):
        return None  # a FIFO (or device) would block the read: never opened; the checkpoint walk reports it
    try:
        with open(os.path.join(path, LATEST), encoding="utf-8") as f:
            tag = f.read(256).strip()
    except (OSError, UnicodeDecodeError):
        return None
    return paths.folder_named(path, tag)


def detect(path: str) -> bool:
    """A tag dir, or a save dir: also one whose `latest` or model states are lost (read() says so)."""
    if tag_dir(path) is not None:
        return True
    if not os.path.isdir(path):
        return False
    names = os.listdir(path)
    return LATEST in names or any(OPTIM_STATES.fullmatch(n) for n in names) or any(
        os.path.isdir(os.path.join(path, n)) and any(MODEL_STATES.fullmatch(e) or OPTIM_STATES.fullmatch(e)
                                                     for e in os.listdir(os.path.join(path, n))) for n in names)


def read(path: str, *, role: str | None = None, name: str | None = None) -> Checkpoint:
    """A whole checkpoint, which names its own parts (`role` and `name` are not used)."""
    folder = tag_dir(path)
    if folder is None:
        return _no_tag(path)
    entries = sorted(os.listdir(folder))
    ckpt = Checkpoint(folder, "deepspeed", "DeepSpeed engine checkpoint")
    if folder != os.path.normpath(path):
        ckpt.metadata["tag_from"] = os.path.join(path, LATEST)
    model_files = {int(m.group(1) or 0): os.path.join(folder, e) for e in entries
                   if (m := MODEL_STATES.fullmatch(e)) and m.group(2) == "00"}
    optim_files = {int(m.group(1)): os.path.join(folder, e) for e in entries
                   if (m := OPTIM_STATES.fullmatch(e)) and m.group(2) == "00"}
    other_mp = sorted(e for e in entries if (MODEL_STATES.fullmatch(e) or OPTIM_STATES.fullmatch(e))
                      and "mp_rank_00" not in e)
    if other_mp:
        ckpt.metadata["other_model_parallel_files"] = other_mp  # tensor parallelism: only mp rank 0 is consolidated
    if 0 not in model_files:
        ckpt.add_problem(Code.MISSING_FILE, ERROR, "no mp_rank_00 model states file (the engine writes it first)",
                         os.path.join(folder, "mp_rank_00_model_states.pt"))
        ckpt.files.extend(os.path.join(folder, e) for e in entries)
        return ckpt
    raws: dict = {}  # file -> RawPickle: its object and where its storages lie
    states = _read(ckpt, raws, model_files[0])
    if states is None:  # unreadable: _read said why
        ckpt.files.extend(os.path.join(folder, e) for e in entries)
        return ckpt
    if not isinstance(states, dict) or "param_shapes" not in states:
        raise CkptError(Code.CORRUPT, "not DeepSpeed model states: no param_shapes", model_files[0])
    optims = {r: _read(ckpt, raws, f) for r, f in sorted(optim_files.items())}
    optims = {r: o["optimizer_state_dict"] for r, o in optims.items()
              if isinstance(o, dict) and isinstance(o.get("optimizer_state_dict"), dict)}
    stage = _stage(next(iter(optims.values()), None))
    ckpt.layout = f"DeepSpeed ZeRO-{stage}" if stage else "DeepSpeed engine checkpoint (no ZeRO)"
    ckpt.metadata.update({k: torchtree.plain(states.get(k)) for k in ("ds_version", "dp_world_size", "mp_world_size")
                          if k in states})
    world = _world(optims, states)
    if stage:  # what a resume must match: ZeRO loads each rank's partition by rank
        ckpt.metadata.update({"zero_stage": stage, "data_parallel_world_size": world})
    for rank in sorted(model_files)[1:] if stage == 3 else ():  # their pieces of the frozen parameters
        _read(ckpt, raws, model_files[rank])
    if not 0 < world <= MAX_WORLD:
        raise CkptError(Code.CORRUPT, f"the optimizer states give {world} ranks, not a world size", folder)
    expected = set(range(world)) if stage else set()
    _missing(ckpt, folder, sorted(expected - set(optim_files)), "optimizer", world, lambda rank: (
        f"{'its piece of every parameter' if stage == 3 else _zero2_held(states, optims, rank, world)} and its part "
        "of the optimizer state are lost"))
    if stage == 3:
        _missing(ckpt, folder, sorted(expected - set(model_files)), "model", world,
                 lambda rank: "its pieces of the frozen parameters are lost")
    ckpt.files.extend([model_files[r] for r in sorted(model_files)] + [optim_files[r] for r in sorted(optim_files)])
    complete = not any(p.code in (Code.MISSING_FILE, Code.TRUNCATED, Code.CORRUPT) for p in ckpt.problems)
    ckpt.components.append(_model(ckpt, raws, states, model_files, optims, optim_files, stage, world, complete))
    ckpt.components.extend(_training_state(ckpt, raws, states, optims, optim_files, model_files))
    return ckpt


def _no_tag(path: str) -> Checkpoint:
    """A save dir whose `latest` names no tag dir, or a tag dir without its model states: nothing DeepSpeed can load."""
    ckpt = Checkpoint(path, "deepspeed", "DeepSpeed engine checkpoint")
    names = sorted(os.listdir(path))
    ckpt.files.extend(os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n)))
    latest = os.path.join(path, LATEST)
    if any(OPTIM_STATES.fullmatch(n) for n in names):
        ckpt.add_problem(Code.MISSING_FILE, ERROR, "no mp_rank_00 model states file (the engine writes it first): "
                         "load_checkpoint cannot load this tag", os.path.join(path, "mp_rank_00_model_states.pt"))
    elif not os.path.isfile(latest):
        ckpt.add_problem(Code.MISSING_FILE, ERROR, "no `latest` file naming the tag to load: load_checkpoint(tag=None) "
                         "warns 'Unable to find latest file' and returns (None, None), so the run starts over; pass "
                         "the tag (load_checkpoint(dir, tag='global_stepN')) or write it into `latest`", latest)
    else:
        with open(latest, encoding="utf-8", errors="replace") as f:
            tag = f.read(256).strip()
        ckpt.add_problem(Code.CORRUPT, ERROR, f"`latest` names {tag!r}, which is no tag dir here (cut short or "
                         "damaged?): load_checkpoint(tag=None) cannot load it", latest)
    return ckpt


def _missing(ckpt: Checkpoint, folder: str, ranks: list[int], kind: str, world: int, lost, shown: int = 16):
    """One missing_file problem per absent rank file (the first `shown`; then one for the rest)."""
    for rank in ranks[:shown]:
        ckpt.add_problem(Code.MISSING_FILE, ERROR, f"rank {rank}'s {kind} states are missing ({world} ranks saved "
                         f"this checkpoint): {lost(rank)}",
                         os.path.join(folder, f"zero_pp_rank_{rank}_mp_rank_00_{kind.replace('optimizer', 'optim')}"
                                              "_states.pt"))
    if len(ranks) > shown:
        ckpt.add_problem(Code.MISSING_FILE, ERROR, f"and the {kind} states of {len(ranks) - shown} more ranks "
                         f"({', '.join(map(str, ranks[shown:shown + 8]))}, ...) are missing", folder)


def _read(ckpt: Checkpoint, raws: dict, path: str):
    """One torch file's object through the safe reader, its storages remembered for locating tensors."""
    try:
        raw = torchfile.read_raw(path, DEEPSPEED_GLOBALS)
    except CkptError as e:
        ckpt.add_problem(e.code, ERROR, e.reason, path)
        return None
    torchfile.note_pickle(ckpt, raw, path)
    raws[path] = raw
    return raw.obj


def _zero2_held(states: dict, optims: dict, rank: int, world: int, shown: int = 8) -> str:
    """The parameters whose master weights a missing ZeRO-1/2 rank held: every rank but the last holds an equal
    slice of each group's vector (the last one's padding is not saved)."""
    names = []
    for g, group in enumerate(g for g in states.get("param_shapes") or [] if isinstance(g, dict)):
        sizes = [math.prod(refs[g].shape) for r, o in optims.items() if r != world - 1
                 for refs in [_flat(o.get("single_partition_of_fp32_groups"))] if g < len(refs)]
        if not sizes:
            return "its slice of the parameters"
        lo, hi, offset = rank * sizes[0], (rank + 1) * sizes[0], 0
        for name, shape in group.items():
            if offset < hi and offset + math.prod(shape) > lo:
                names.append(name)
            offset += math.prod(shape)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"its slice of {len(names)} parameters ({', '.join(names[:shown])}{more})"


def _stage(optim: dict | None) -> int | None:
    value = optim.get("zero_stage") if isinstance(optim, dict) else None
    value = value.args[0] if isinstance(value, Opaque) and value.args else value  # ZeroStageEnum(N)
    return value if type(value) is int else None


def _world(optims: dict, states: dict) -> int:
    """The data-parallel world size the save was made with: the optimizer's partition_count (a list per group under
    ZeRO-1/2; zero_to_fp32 takes its max), else the model states' dp_world_size."""
    for optim in optims.values():
        count = optim.get("partition_count") if isinstance(optim, dict) else None
        count = max(count) if isinstance(count, list) and count and all(type(c) is int for c in count) else count
        if type(count) is int and count > 0:
            return count
    return states.get("dp_world_size") if type(states.get("dp_world_size")) is int else 1


def _location(raws: dict, path: str, ref: TensorRef, start: int, count: int) -> Location:
    """`count` elements of a flat saved tensor from element `start`, as a byte range of its file."""
    info = torchtree.tensor_info("", ref, raws[path], path)
    itemsize = max(1, info.nbytes // max(1, info.numel))
    loc = info.location
    return Location(path, loc.offset + (loc.storage_offset + start) * itemsize, count * itemsize, device=loc.device)


def _flat(value) -> list[TensorRef]:
    items = value if isinstance(value, (list, tuple)) else [value]
    return [t for t in items if isinstance(t, TensorRef)]


def _model(ckpt, raws, states, model_files, optims, optim_files, stage, world, complete) -> Component:
    """The consolidated weights, as zero_to_fp32 builds them: buffers, frozen parameters, trainable parameters,
    tied ones."""
    path0 = model_files[0]
    component = Component("model", "model", files=list(ckpt.files))
    module = states.get("module") if isinstance(states.get("module"), dict) else {}
    tensors = component.tensors
    for name in states.get("buffer_names") or []:
        if isinstance(module.get(name), TensorRef):
            tensors.append(torchtree.tensor_info(name, module[name], raws[path0], path0))
    shapes = [g for g in states.get("param_shapes") or [] if isinstance(g, dict)]
    frozen = states.get("frozen_param_shapes") if isinstance(states.get("frozen_param_shapes"), dict) else {}
    for name, shape in frozen.items():
        tensors.append(_frozen(raws, name, tuple(shape), model_files, stage, world, complete))
    if not optims:  # no ZeRO: the module holds the weights themselves
        for group in shapes:
            for name in group:
                if isinstance(module.get(name), TensorRef):
                    tensors.append(torchtree.tensor_info(name, module[name], raws[path0], path0))
    elif stage == 3:
        tensors.extend(_zero3(raws, shapes, optims, optim_files, world, complete))
    else:
        tensors.extend(_zero2(raws, shapes, optims, optim_files, world, complete))
    by_name = {t.name: t for t in tensors}
    for alias, target in (states.get("shared_params") or {}).items():
        if target in by_name:
            t = by_name[target]
            key = t.storage_key or f"shared:{target}"
            t.storage_key = key
            tensors.append(TensorInfo(alias, t.dtype, t.shape, t.location, key, t.chunks))
    return component


def _frozen(raws, name, shape, model_files, stage, world, complete) -> TensorInfo:
    """A frozen parameter: whole in the model states under ZeRO-1/2, one padded piece per rank under ZeRO-3."""
    pieces = []
    for rank in range(world if stage == 3 else 1):
        path = model_files.get(rank)
        fragments = raws.get(path) if path else None
        ref = fragments.obj.get("frozen_param_fragments", {}).get(name) if fragments else None
        if isinstance(ref, TensorRef):
            pieces.append((path, ref))
    dtype = pieces[0][1].dtype if pieces else "float32"
    if stage != 3 and pieces:
        return torchtree.tensor_info(name, pieces[0][1], raws[pieces[0][0]], pieces[0][0])
    numel, chunks, done = math.prod(shape), [], 0
    for path, ref in pieces if complete and len(pieces) == world else ():
        count = min(math.prod(ref.shape), numel - done)
        if count > 0:
            chunks.append(Chunk((done,), (count,), _location(raws, path, ref, 0, count)))
            done += count
    return TensorInfo(name, dtype, shape, chunks=tuple(chunks) if done == numel else ())


def _zero2(raws, shapes, optims, optim_files, world, complete) -> list[TensorInfo]:
    tensors = []
    for g, group in enumerate(shapes):
        partitions = []  # (file, tensor, first element in the group's vector)
        start = 0
        for rank in range(world):
            refs = _flat(optims.get(rank, {}).get("single_partition_of_fp32_groups")) if complete else []
            if g < len(refs):
                partitions.append((optim_files[rank], refs[g], start))
                start += math.prod(refs[g].shape)
        paddings = (optims.get(0) or {}).get("param_alignment_paddings")
        paddings = paddings[g] if isinstance(paddings, list) and g < len(paddings) else None
        offset = 0
        for i, (name, shape) in enumerate(group.items()):
            numel = math.prod(shape)
            chunks = _slices(raws, partitions, offset, numel) if len(partitions) == world else ()
            tensors.append(TensorInfo(name, partitions[0][1].dtype if partitions else "float32", tuple(shape),
                                      chunks=chunks))
            offset += numel + (paddings[i] if isinstance(paddings, list) and i < len(paddings) else 0)
        if partitions and len(partitions) == world:
            align = 2 * world  # zero_to_fp32: both sides rounded up to 2 * world_size before comparing
            if align * math.ceil(offset / align) != align * math.ceil(start / align):
                raise CkptError(Code.CORRUPT, f"param group {g} needs {offset} elements, its partitions hold {start}",
                                optim_files[0])
    return tensors


def _slices(raws, partitions, offset, numel) -> tuple:
    """The chunks of the group-vector range [offset, offset + numel) in the partitions that hold it."""
    chunks = []
    for path, ref, first in partitions:
        size = math.prod(ref.shape)
        lo, hi = max(offset, first), min(offset + numel, first + size)
        if lo < hi:
            chunks.append(Chunk((lo - offset,), (hi - lo,), _location(raws, path, ref, lo - first, hi - lo)))
    return tuple(chunks) if sum(c.sizes[0] for c in chunks) == numel else ()


def _zero3(raws, shapes, optims, optim_files, world, complete) -> list[TensorInfo]:
    merged = {name: tuple(shape) for group in shapes for name, shape in group.items()}
    per_rank = {}  # rank -> [(file, tensor, first element in the rank's concatenated groups)]
    for rank in range(world):
        refs = _flat(optims.get(rank, {}).get("fp32_flat_groups")) if complete else []
        first, parts = 0, []
        for ref in refs:
            parts.append((optim_files[rank], ref, first))
            first += math.prod(ref.shape)
        per_rank[rank] = parts
    usable = complete and all(per_rank[r] for r in range(world))
    tensors, offset = [], 0
    for name, shape in merged.items():
        numel = math.prod(shape)
        piece = math.ceil(numel / world)
        chunks = []
        for rank in range(world):
            count = min(piece, numel - rank * piece)
            if count <= 0 or not usable:
                continue
            for c in _slices(raws, per_rank[rank], offset, count):
                chunks.append(Chunk((rank * piece + c.offsets[0],), c.sizes, c.location))
        covered = sum(c.sizes[0] for c in chunks) == numel
        dtype = per_rank[0][0][1].dtype if usable else "float32"
        tensors.append(TensorInfo(name, dtype, shape, chunks=tuple(chunks) if covered else ()))
        offset += piece
    if usable:
        held = sum(math.prod(ref.shape) for _, ref, _ in per_rank[0])
        if offset != held:
            raise CkptError(Code.CORRUPT, f"the parameters need {offset} elements per rank, rank 0 holds {held}",
                            optim_files[0])
    return tensors


def _training_state(ckpt, raws, states, optims, optim_files, model_files) -> list[Component]:
    """The optimizer state (every rank's file), the LR scheduler and the engine's counters (in every rank's model
    states file, where ZeRO-3 writes one per rank: they must agree)."""
    parts = []
    path0 = model_files[0]
    for key in ("global_steps", "skipped_steps", "global_samples"):
        if type(states.get(key)) is int:
            per_file = {os.path.basename(f): raws[f].obj[key] for _, f in sorted(model_files.items())
                        if f in raws and isinstance(raws[f].obj, dict) and type(raws[f].obj.get(key)) is int}
            ckpt.steps.append(StepSource(f"model states {key}", states[key], record=Record.ENGINE, key=key,
                                         file=os.path.basename(path0),
                                         per_file=tuple(per_file.items()) if len(per_file) > 1 else ()))
    for key in torchtree.STEP_KEYS + torchtree.EPOCH_KEYS:  # client_state the user saved alongside
        if type(states.get(key)) is int:
            ckpt.steps.append(StepSource(f"client_state '{key}'", states[key], record=Record.CLIENT_STATE, key=key,
                                         file=os.path.basename(path0)))
    if not optims and isinstance(states.get("optimizer"), dict):  # no ZeRO: the optimizer is in the model states
        optims, optim_files = {0: states["optimizer"]}, {0: path0}
    if optims:
        comp = Component("optimizer", "optimizer", files=[optim_files[r] for r in sorted(optim_files)])
        for rank, value in sorted(optims.items()):
            prefix = f"rank{rank}." if len(optims) > 1 else ""
            comp.tensors.extend(torchtree.tensor_info(prefix + n, leaf, raws[optim_files[rank]], optim_files[rank])
                                for n, leaf in torchtree.flatten(value) if isinstance(leaf, TensorRef))
        parts.append(comp)
        per_file = {}
        for rank in sorted(optims):  # every rank's partition steps together: one that differs is from another save
            # the torch optimizer's own state dict: ZeRO-1/2 base_optimizer_state, ZeRO-3 optimizer_state_dict
            inner = next((optims[rank][k] for k in ("base_optimizer_state", "optimizer_state_dict")
                          if isinstance(optims[rank].get(k), dict)), optims[rank])
            step = torchtree.optimizer_step(inner, raws[optim_files[rank]], optim_files[rank])
            if step is not None:
                per_file[os.path.basename(optim_files[rank])] = step
        if per_file:
            first = next(iter(per_file))
            ckpt.steps.append(StepSource("optimizer state step", max(per_file.values()), OPTIMIZER_UPDATES,
                                         record=Record.OPTIMIZER, key="step", file=first,
                                         per_file=tuple(per_file.items()) if len(per_file) > 1 else ()))
    scheduler = states.get("lr_scheduler")
    if isinstance(scheduler, dict):
        parts.append(Component("lr_scheduler", "scheduler", files=[path0], tree=scheduler))
        if type(scheduler.get("last_batch_iteration")) is int:  # DeepSpeed's schedulers: -1 before the first step
            ckpt.steps.append(StepSource("lr_scheduler last_batch_iteration + 1",
                                         scheduler["last_batch_iteration"] + 1, record=Record.SCHEDULER,
                                         key="lr_scheduler.last_batch_iteration", file=os.path.basename(path0)))
        elif type(scheduler.get("last_epoch")) is int:  # a torch LRScheduler given to the engine
            ckpt.steps.append(StepSource("lr_scheduler last_epoch", scheduler["last_epoch"], record=Record.SCHEDULER,
                                         key="lr_scheduler.last_epoch", file=os.path.basename(path0)))
    return parts
