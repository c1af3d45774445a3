"""Hostile and careless inputs for tests/test_hardening.py (issue 29), each built from scratch: a few hundred bytes
of shared references, payload pickles, paths out of the checkpoint, a forged manifest, duplicate zip members.

No payload is ever executed: payload pickles are written by pickling an object whose __reduce__ names os.system
(pickling never calls it), and the tests never unpickle them with anything but ckpttool's reader.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import struct
import tempfile
import warnings
import zipfile

import torch
from safetensors.torch import save_file

from ckpttool.synthetic.catalog import SAMPLES as SHIPPED
from helpers import cli, state_dir

MARKER = os.path.join(tempfile.gettempdir(), "ckpttool-hostile-PWNED")  # what a payload would create
DEEPSPEED_SAMPLE = os.path.join(SHIPPED, "deepspeed", "zero2")


class Payload:
    """Pickles to GLOBAL 'posix system' + REDUCE('touch MARKER'). Pickling it runs nothing."""

    def __reduce__(self):
        return os.system, (f"touch {MARKER}",)


def raw_payload_pickle(cmd=f"touch {MARKER}") -> bytes:
    """Protocol-2 opcodes by hand: PROTO 2, GLOBAL 'posix system', BINUNICODE cmd, TUPLE1, REDUCE, STOP."""
    arg = cmd.encode()
    return b"\x80\x02" + b"cposix\nsystem\n" + b"X" + struct.pack("<I", len(arg)) + arg + b"\x85" + b"R" + b"."


def _run(root, steps, name="RUN"):
    run = os.path.join(root, name)
    os.makedirs(run, exist_ok=True)
    for s in steps:
        state_dir(os.path.join(run, f"checkpoint-{s}"), s)
    return run


# 1 ---------------------------------------------------------------------------------------------------------------
def build_prune_unresumable_newest(tmp):
    """RUN: checkpoint-5/10/15 healthy, checkpoint-20 without optimizer.bin and scheduler.bin."""
    run = _run(tmp, (5, 10, 15, 20))
    for f in ("optimizer.bin", "scheduler.bin"):
        os.remove(os.path.join(run, "checkpoint-20", f))
    return {"run": run}


# 2 ---------------------------------------------------------------------------------------------------------------
def build_prune_non_checkpoints(tmp):
    """RUN: checkpoint-5/10/15 plus files whose names carry numbers but are no checkpoints of the run."""
    run = _run(tmp, (5, 10, 15))
    with open(os.path.join(run, "train_data_7.bin"), "wb") as f:
        f.write(random.Random(7).randbytes(1000))
    with open(os.path.join(run, "notes_v2.pt"), "w") as f:
        json.dump({"notes": "lr sweep v2", "todo": ["eval"]}, f)
    save_file({"conv.weight": torch.zeros(4, 4, dtype=torch.float16)}, os.path.join(run, "unet_fp16.safetensors"))
    return {"run": run, "others": ["train_data_7.bin", "notes_v2.pt", "unet_fp16.safetensors"]}


# 3 ---------------------------------------------------------------------------------------------------------------
def build_convert_dst_holds_src(tmp):
    """RUN checkpoint-5/10/15 (DST will be RUN itself: a folder that holds SRC), plus m.safetensors and alias -> '.'."""
    run = _run(tmp, (5, 10, 15))
    m = os.path.join(tmp, "m.safetensors")
    save_file({"w": torch.arange(16, dtype=torch.float32).reshape(4, 4)}, m, metadata={"format": "pt"})
    os.symlink(".", os.path.join(tmp, "alias"))
    return {"run": run, "src": os.path.join(run, "checkpoint-15"), "m": m,
            "alias_dst": os.path.join(tmp, "alias", "m.safetensors")}


# 4 ---------------------------------------------------------------------------------------------------------------
def _outside_secret(tmp):
    outside = os.path.join(tmp, "outside")
    os.makedirs(outside, exist_ok=True)
    secret = os.path.join(outside, "secret.txt")
    with open(secret, "w") as f:
        f.write("TOP SECRET\n")
    return secret


def build_symlink_outside_repair(tmp):
    """A damaged state dir (model.safetensors cut by 10 bytes) holding notes.txt -> ../outside/secret.txt."""
    secret = _outside_secret(tmp)
    src = state_dir(os.path.join(tmp, "src"), 3)
    model = os.path.join(src, "model.safetensors")
    os.truncate(model, os.path.getsize(model) - 10)
    os.symlink("../outside/secret.txt", os.path.join(src, "notes.txt"))
    return {"src": src, "dst": os.path.join(tmp, "dst"), "secret": secret}


def build_symlink_outside_prune(tmp):
    """RUN/checkpoints is a symlink to another folder holding checkpoint-1..3."""
    elsewhere = os.path.join(tmp, "elsewhere")
    _run(tmp, (1, 2, 3), name="elsewhere")
    run = os.path.join(tmp, "RUN")
    os.makedirs(run)
    os.symlink(elsewhere, os.path.join(run, "checkpoints"))
    return {"run": run, "elsewhere": elsewhere}


def build_symlink_outside_fifo(tmp):
    """A healthy state dir holding a FIFO named extra.bin."""
    d = state_dir(os.path.join(tmp, "ckpt"), 3)
    os.mkfifo(os.path.join(d, "extra.bin"))
    return {"dir": d}


# 5 ---------------------------------------------------------------------------------------------------------------
def build_payload_unread_file_transformers(tmp):
    """A real transformers.Trainer run (tiny GPT-2, checkpoint-2 and -4) whose newest training_args.bin is a torch
    zip whose data.pkl is GLOBAL 'posix system' + REDUCE."""
    from ckpttool.synthetic.runs import transformers_run

    run = transformers_run(os.path.join(tmp, "RUN"), max_steps=4, save_steps=2)
    ckpt = os.path.join(run, "checkpoint-4")
    torch.save(Payload(), os.path.join(ckpt, "training_args.bin"))  # pickles, never runs
    return {"run": run, "dir": ckpt}


def build_payload_unread_file_accelerate(tmp):
    """A real Accelerate save_state whose random_states_0.pkl is a torch zip holding the posix.system payload."""
    from fixtures.generate import _accelerate_state

    d = os.path.join(tmp, "checkpoint-3")
    _accelerate_state(d)
    torch.save(Payload(), os.path.join(d, "random_states_0.pkl"))
    return {"dir": d}


# 6 ---------------------------------------------------------------------------------------------------------------
def build_convert_carries_payload(tmp):
    """X.pt: a model plus an optimizer whose param group holds a set containing REDUCE(posix.system, ...)."""
    x = os.path.join(tmp, "X.pt")
    torch.save({"model": {"w": torch.ones(4)},
                "optimizer": {"state": {}, "param_groups": [{"params": [0], "lr": 0.1, "x": {Payload()}}]}}, x)
    return {"src": x, "dst": os.path.join(tmp, "OUT.pt")}


def pickle_globals(path) -> list[str]:
    """GLOBAL/STACK_GLOBAL names in every .pkl member of a torch zip (or a raw pickle), by pickletools.genops only."""
    import pickletools

    blobs = []
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            blobs = [z.read(n) for n in z.namelist() if n.endswith(".pkl")]
    else:
        with open(path, "rb") as f:
            blobs = [f.read()]
    found = []
    for blob in blobs:
        strings = []
        for op, arg, _ in pickletools.genops(io.BytesIO(blob)):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
                strings.append(arg)
            if op.name == "GLOBAL":
                found.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
    return found


# 7 ---------------------------------------------------------------------------------------------------------------
def build_manifest_outside(tmp, piece_size=None):
    """A healthy state dir with a ckpttool manifest (written by `ckpttool manifest`) then edited: `files` also names
    ../outside/secret.txt and /etc/hostname with their real sizes (a forger knows them); optional piece_size."""
    secret = _outside_secret(tmp)
    d = state_dir(os.path.join(tmp, "ckpt"), 3)
    assert cli("manifest", d)[0].exit_code == 0
    mpath = os.path.join(d, "ckpttool-manifest.json")
    with open(mpath) as f:
        doc = json.load(f)
    for rel, full in (("../outside/secret.txt", secret), ("/etc/hostname", "/etc/hostname")):
        size = os.path.getsize(full) if os.path.exists(full) else 12
        doc["files"][rel] = {"size": size, "xxh3_128": "0" * 32, "pieces": ["0" * 32]}
    if piece_size is not None:
        doc["piece_size"] = piece_size
    with open(mpath, "w") as f:
        json.dump(doc, f, indent=1)
    return {"dir": d, "manifest": mpath}


def build_manifest_piece_size_1(tmp):
    """The same, with "piece_size": 1 (one hash job per byte of every file)."""
    return build_manifest_outside(tmp, piece_size=1)


# 8 ---------------------------------------------------------------------------------------------------------------
def build_dcp_outside(tmp):
    """A DCP dir of {"w": tensor, "note": "hello"} whose .metadata sends w's bytes to ../outside/victim.distcp (a
    real file there: a copy of the data file, so reads succeed), and the note's to the real data file."""
    import pickle

    import torch.distributed.checkpoint as dcp

    d = os.path.join(tmp, "dcp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.arange(8, dtype=torch.float32), "note": "hello"}, checkpoint_id=d, no_dist=True)
    outside = os.path.join(tmp, "outside")
    os.makedirs(outside)
    data_files = sorted(f for f in os.listdir(d) if f.endswith(".distcp"))
    shutil.copy(os.path.join(d, data_files[0]), os.path.join(outside, "victim.distcp"))
    meta = dcp.FileSystemReader(d).read_metadata()  # our own freshly written metadata
    changed = []
    for index, info in list(meta.storage_data.items()):
        if index.fqn == "w":
            meta.storage_data[index] = type(info)(relative_path="../outside/victim.distcp", offset=info.offset,
                                                  length=info.length)
            changed.append(index.fqn)
    with open(os.path.join(d, ".metadata"), "wb") as f:
        pickle.dump(meta, f)
    return {"dir": d, "victim": os.path.join(outside, "victim.distcp"), "changed": changed}


def build_deepspeed_latest_dotdot(tmp):
    """A copy of the committed real ZeRO-2 save dir (ckpttool/synthetic/samples/deepspeed/zero2) whose `latest`
    holds '..'; its parent also holds an unrelated secret.txt."""
    parent = os.path.join(tmp, "parent")
    os.makedirs(parent)
    with open(os.path.join(parent, "secret.txt"), "w") as f:
        f.write("TOP SECRET\n")
    d = shutil.copytree(DEEPSPEED_SAMPLE, os.path.join(parent, "save"))
    with open(os.path.join(d, "latest"), "w") as f:
        f.write("..")
    return {"dir": d, "parent": parent}


# 9 ---------------------------------------------------------------------------------------------------------------
def build_duplicate_zip_members(tmp, nan_first=True):
    """torch.save({"w": ones(4)}) rewritten with two '<archive>/data/0' members: NaNs and the real ones (NaNs first
    in the archive unless nan_first=False)."""
    src = os.path.join(tmp, "orig.pt")
    torch.save({"w": torch.ones(4)}, src)
    x = os.path.join(tmp, "X.pt")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(x, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/data/0"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "Duplicate name"
                    nan = struct.pack("<4f", *[float("nan")] * 4)
                    for blob in ((nan, data) if nan_first else (data, nan)):
                        zout.writestr(info.filename, blob)
            else:
                zout.writestr(info.filename, data)
    os.remove(src)
    return {"file": x}


# 10 --------------------------------------------------------------------------------------------------------------
def build_shared_refs_list(tmp):
    """RUN: healthy checkpoint-10 and step_20.pt = a list nested 60 deep, each level [a, a] (2**60 paths)."""
    run = _run(tmp, (10,))
    a = []
    for _ in range(60):
        a = [a, a]
    torch.save(a, os.path.join(run, "step_20.pt"))
    return {"run": run}


def build_shared_refs_dict(tmp):
    """x.pt = a dict nested 30 deep, each level {"a": d, "b": d}."""
    d = {}
    for _ in range(30):
        d = {"a": d, "b": d}
    x = os.path.join(tmp, "x.pt")
    torch.save(d, x)
    return {"file": x}


# 11 --------------------------------------------------------------------------------------------------------------
def build_deflated_pickle(tmp, size=1 << 30):
    """A torch-layout zip whose archive/data.pkl (deflated, ~1 MB stored) is a pickle of `size` zero bytes
    (PROTO 3, BINBYTES len, ..., STOP), written streamed."""
    x = os.path.join(tmp, "X.pt")
    with zipfile.ZipFile(x, "w") as z:
        info = zipfile.ZipInfo("archive/data.pkl")
        info.compress_type = zipfile.ZIP_DEFLATED
        with z.open(info, "w", force_zip64=True) as m:
            m.write(b"\x80\x03B" + struct.pack("<I", size))
            chunk = bytes(16 << 20)
            left = size
            while left:
                n = min(left, len(chunk))
                m.write(chunk[:n])
                left -= n
            m.write(b".")
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        z.writestr("archive/.data/serialization_id", "0123456789")
    return {"file": x}


# 12 --------------------------------------------------------------------------------------------------------------
def build_yaml_anchors(tmp):
    """A ~500-byte YAML of 9 levels of 9 aliases each (9**9 leaves once expanded) plus global_step, and a healthy
    state dir to verify with it."""
    d = state_dir(os.path.join(tmp, "ckpt"), 3)
    names = "abcdefghi"
    lines = ["a: &a [x,x,x,x,x,x,x,x,x]"]
    for prev, cur in zip(names, names[1:]):
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    lines.append("global_step: 3")
    cfg = os.path.join(tmp, "CFG.yaml")
    with open(cfg, "w") as f:
        f.write("\n".join(lines) + "\n")
    return {"dir": d, "config": cfg, "bytes": os.path.getsize(cfg)}


# 13 --------------------------------------------------------------------------------------------------------------
def build_malformed_candidate_deep_json(tmp, depth=100000, name="step_20.safetensors"):
    """RUN: healthy checkpoint-10 and a newer `name` whose safetensors header JSON is '[' * depth + ']' * depth.
    step_20.safetensors: a name discovery takes as a candidate."""
    run = _run(tmp, (10,))
    header = b"[" * depth + b"]" * depth
    path = os.path.join(run, name)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
    return {"run": run, "candidate": path}


def build_malformed_candidate_manifest(tmp):
    """RUN: healthy checkpoint-10 and -20, checkpoint-20's ckpttool-manifest.json has "files": {"x": "y"}."""
    run = _run(tmp, (10, 20))
    cand = os.path.join(run, "checkpoint-20")
    assert cli("manifest", cand)[0].exit_code == 0
    mpath = os.path.join(cand, "ckpttool-manifest.json")
    with open(mpath) as f:
        doc = json.load(f)
    doc["files"] = {"x": "y"}
    with open(mpath, "w") as f:
        json.dump(doc, f)
    return {"run": run, "candidate": cand}


# 14 --------------------------------------------------------------------------------------------------------------
def build_control_chars(tmp):
    """A safetensors file whose one tensor name holds a screen clear, a title-setting OSC and a fake 'OK' line."""
    x = os.path.join(tmp, "X.safetensors")
    save_file({"w\x1b[2J\x1b]0;TITLE\x07\nOK: verified": torch.ones(2)}, x, metadata={"format": "pt"})
    return {"file": x}


# 15 --------------------------------------------------------------------------------------------------------------
class Four(torch.nn.Module):
    """Four parameters of four different shapes: 4x3, 4, 2x4, 2."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 4)
        self.b = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _live(seed=0):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.manual_seed(seed)
    model = Four()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    acc = Accelerator(cpu=True)
    model, opt, sched = acc.prepare(model, opt, sched)
    return acc, model, opt, sched


def _step(model, opt, sched):
    loss = model(torch.randn(5, 3)).pow(2).mean()
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


GATE_VARIANTS = ("healthy", "steplr_scheduler", "optimizer_3_of_4", "swapped_moments", "numpy_lr")


def build_gate_live_mismatch(tmp, variant):
    """A real Accelerate save_state of Four/AdamW/LambdaLR after 2 steps, then one edit:
    steplr_scheduler: scheduler.bin = a StepLR state_dict; optimizer_3_of_4: optimizer.bin loses state[3] AND the
    id 3 from param_groups[0]['params'] (3 params listed and stated, live has 4); swapped_moments: exp_avg of
    params 0 (4x3) and 1 (4) swapped; numpy_lr: param_groups[0]['lr'] = numpy.float64."""
    import numpy as np

    acc, model, opt, sched = _live()
    for _ in range(2):
        _step(model, opt, sched)
    d = os.path.join(tmp, "checkpoint-2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acc.save_state(d)
    opt_file = os.path.join(d, "optimizer.bin")
    state = torch.load(opt_file, weights_only=True) if variant != "steplr_scheduler" else None  # our own tensors
    if variant == "steplr_scheduler":
        o = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        torch.save(torch.optim.lr_scheduler.StepLR(o, 1).state_dict(), os.path.join(d, "scheduler.bin"))
    elif variant == "optimizer_3_of_4":
        del state["state"][3]
        state["param_groups"][0]["params"].remove(3)
    elif variant == "swapped_moments":
        s = state["state"]
        s[0]["exp_avg"], s[1]["exp_avg"] = s[1]["exp_avg"], s[0]["exp_avg"]
    elif variant == "numpy_lr":
        state["param_groups"][0]["lr"] = np.float64(state["param_groups"][0]["lr"])
    if state is not None and variant != "healthy":
        torch.save(state, opt_file)
    return {"dir": d}


# second attack pass -----------------------------------------------------------------------------------------------
def _opcode_string(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def payload_after_a_refused_call() -> bytes:
    """A pickle that first calls _codecs.encode('abc', 'utf-8') (pickle.load does it; ckpttool's stand-in refuses
    any codec but latin1), drops the result, then calls posix.system."""
    return (b"\x80\x02c_codecs\nencode\n" + _opcode_string("abc") + _opcode_string("utf-8") + b"\x86R0" +
            b"cposix\nsystem\n" + _opcode_string(f"touch {MARKER}") + b"\x85R.")


def global_call(module: str, name: str) -> bytes:
    """A pickle that calls module.name('x') through GLOBAL + REDUCE (never unpickled here)."""
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + _opcode_string("x") + b"\x85R."


def computed_global_call() -> bytes:
    """A protocol-4 STACK_GLOBAL whose module name is not a string pushed by an opcode but the result of a call."""
    return (b"\x80\x04\x8c\x08builtins\x8c\x03str\x93" + _opcode_string("posix") + b"\x85R" +
            _opcode_string("system") + b"\x93" + _opcode_string("x") + b"\x85R.")


def build_dcp_bad_range(tmp, offset=-100):
    """A DCP dir of {"w", "note"} whose .metadata gives the note object's item a negative byte offset."""
    import pickle

    import torch.distributed.checkpoint as dcp

    d = os.path.join(tmp, "dcp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.arange(8, dtype=torch.float32), "note": "hello"}, checkpoint_id=d, no_dist=True)
    meta = dcp.FileSystemReader(d).read_metadata()  # our own freshly written metadata
    for index, info in list(meta.storage_data.items()):
        if index.fqn == "note":
            meta.storage_data[index] = type(info)(relative_path=info.relative_path, offset=offset,
                                                  length=info.length)
    with open(os.path.join(d, ".metadata"), "wb") as f:
        pickle.dump(meta, f)
    return {"dir": d}


def build_extra_member_bombs(tmp, members=4, size=16 << 20):
    """A real torch.save file with `members` extra deflated members, each a pickle of `size` one-byte opcodes
    (EMPTY_LIST, POP): a few KB on disk, millions of opcodes to walk."""
    import io as _io

    src = io.BytesIO()
    torch.save({"w": torch.ones(4)}, src)
    x = os.path.join(tmp, "extra.pt")
    body = b"\x80\x02" + b"]0" * (size // 2) + b"N."
    with zipfile.ZipFile(_io.BytesIO(src.getvalue())) as zin, zipfile.ZipFile(x, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info), zipfile.ZIP_STORED)
        folder = zin.infolist()[0].filename.split("/")[0]
        for i in range(members):
            zout.writestr(f"{folder}/extra{i}.pkl", body, zipfile.ZIP_DEFLATED)
    return {"file": x}
