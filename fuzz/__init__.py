"""`python -m fuzz` (`make fuzz`): mutated real checkpoint files through `inspect`, `verify` and the salvage readers
`repair` uses, in-process, at volume; and hostile shapes built from them (SHAPES), each bounded in time and memory.

Seeds are files the real libraries wrote (the fixture corpus): safetensors, torch zip and legacy files, a CUDA-saved
file, Accelerate numpy RNG pickles, an optimizer state, a sharded index JSON. Each input is one seed with seeded
mutations: byte flips, truncations, insertions, and edits aimed at the headers (the safetensors JSON, zip local and
central headers: flags, method, sizes, extra fields). Anything other than the toolkit's own errors is an escape: an
exception of another type, or an error Python printed while reading (an "unraisable" one, such as a buffer released
while a view of it lives). Input N of seed S is the same on every machine: `--seed S --only N` replays one.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import random
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback

SEEDS = ("safetensors", "torch_training", "torch_legacy", "torch_cuda", "torch_numpy_rng", "accelerate_rng",
         "accelerate_optimizer", "sharded_index", "torch_malicious")
# Inputs built, not mutated: the shapes a few hundred hostile bytes take (issue 29). Each must end, within
# INPUT_SECONDS and the workers' address-space limit, in a result or the toolkit's own error, and none may open
# the decoy file outside the scratch dir.
SHAPES = ("shared_refs", "deflated_member", "duplicate_member", "outside_path")
INPUT_SECONDS = 20
WORKER_MEMORY = 3 << 30
ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07")
# (offset, width) of each field of a zip record after its signature: local header, central entry, end record
ZIP_FIELDS = {
    b"PK\x03\x04": [(4, 2), (6, 2), (8, 2), (14, 4), (18, 4), (22, 4), (26, 2), (28, 2)],
    b"PK\x01\x02": [(6, 2), (8, 2), (10, 2), (16, 4), (20, 4), (24, 4), (28, 2), (30, 2), (32, 2), (34, 2), (42, 4)],
    b"PK\x05\x06": [(4, 2), (6, 2), (8, 2), (10, 2), (12, 4), (16, 4), (20, 2)],
}
FLAG_BITS = (0x1, 0x8, 0x40, 0x800, 0x2000)  # encrypted, data descriptor, strong encryption, UTF-8 names, masked


def seed_files(corpus: dict) -> dict[str, str]:
    """Seed name -> the real file it mutates (the index JSON is mutated inside a copy of its folder)."""
    return {
        "safetensors": corpus["safetensors"], "torch_training": corpus["torch_training"],
        "torch_legacy": corpus["torch_legacy"], "torch_cuda": corpus["torch_cuda"],
        "torch_numpy_rng": corpus["torch_numpy_rng"],
        "accelerate_rng": os.path.join(corpus["accelerate"], "random_states_0.pkl"),
        "accelerate_optimizer": os.path.join(corpus["accelerate_bin"], "optimizer.bin"),
        "sharded_index": os.path.join(corpus["sharded"], "model.safetensors.index.json"),
        "torch_malicious": corpus["torch_malicious"],
    }


def header_spans(data: bytes) -> list[tuple[int, int]]:
    """Where a parser works hardest: the safetensors header, and every zip record header (46 bytes + some)."""
    spans = []
    if len(data) > 8 and data[:4] != b"PK\x03\x04":
        (n,) = struct.unpack("<Q", data[:8])
        if 0 < n < len(data):
            spans.append((0, 8 + n))
    for sig in ZIP_SIGNATURES:
        spans.extend((start, min(len(data), start + 64)) for start in _positions(data, sig))
    return spans


def zip_field_edit(out: bytearray, rng: random.Random) -> bool:
    """Set one field of one zip record to a value that means something to a reader: a flag bit (encrypted, data
    descriptor, UTF-8), a compression method, a size or offset off by one, zero, or the zip64 marker 0xFFFFFFFF."""
    records = [(i, sig) for sig in ZIP_FIELDS for i in _positions(bytes(out), sig)]
    if not records:
        return False
    start, sig = rng.choice(records)
    offset, width = rng.choice(ZIP_FIELDS[sig])
    pos = start + offset
    if pos + width > len(out):
        return False
    old = int.from_bytes(out[pos:pos + width], "little")
    choice = rng.random()
    if offset in ((6,) if sig == b"PK\x03\x04" else (8,)) and choice < 0.7:
        new = old ^ rng.choice(FLAG_BITS)
    elif choice < 0.3:
        new = rng.choice((0, 8, 9, 12, 14, 93, 95, 99))
    elif choice < 0.6:
        new = (old + rng.choice((-64, -1, 1, 64, 4096))) % (1 << (8 * width))
    else:
        new = rng.choice((0, (1 << (8 * width)) - 1, (1 << (8 * width - 1))))
    out[pos:pos + width] = new.to_bytes(width, "little")
    return True


def _positions(data: bytes, sig: bytes) -> list[int]:
    found, start = [], data.find(sig)
    while start != -1:
        found.append(start)
        start = data.find(sig, start + 1)
    return found


def mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.random()
        if kind < 0.25 and zip_field_edit(out, rng):
            continue
        spans = header_spans(bytes(out)) if kind < 0.45 else []
        if spans:  # a header edit: a byte, or a field set to an extreme value
            lo, hi = rng.choice(spans)
            pos = rng.randrange(lo, hi)
            if rng.random() < 0.5:
                out[pos] = rng.randrange(256)
            else:
                width = rng.choice((2, 4, 8))
                value = rng.choice((0, 1, 8, 9, 99, 0xFFFF, 0xFFFFFFFF, 2**63 - 1, 2**64 - 1)) % (1 << (8 * width))
                out[pos:pos + width] = value.to_bytes(width, "little")[:hi - pos]
        elif kind < 0.75 and out:
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        elif kind < 0.88:
            cut = rng.randrange(len(out) + 1)
            del out[cut:]
        else:
            pos = rng.randrange(len(out) + 1)
            out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(out)


def shared_refs(rng: random.Random) -> bytes:
    """A pickle of lists and dicts each holding the level below several times: 2^depth paths in a few hundred
    bytes, in a torch zip or bare."""
    import pickle

    node = rng.choice(([], {}, "leaf", 0))
    for level in range(rng.randint(20, 64)):
        width = rng.randint(2, 4)
        node = [node] * width if rng.random() < 0.5 else {f"k{i}": node for i in range(width)}
        if rng.random() < 0.05:
            node = {"state": node, "param_groups": [node]} if rng.random() < 0.5 else {"model": node, "step": level}
    data = pickle.dumps(node, protocol=2)
    return torch_zip({"archive/data.pkl": data, "archive/version": b"3\n"}) if rng.random() < 0.7 else data


def torch_zip(members: dict, deflated=(), duplicate=None) -> bytes:
    """A zip in torch.save's layout: `members` in order, those named in `deflated` compressed, `duplicate` (name,
    bytes) written a second time under the same name."""
    import io
    import warnings
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name it is told to write
        for name, data in members.items():
            z.writestr(name, data, zipfile.ZIP_DEFLATED if name in deflated else zipfile.ZIP_STORED)
            if duplicate and duplicate[0] == name:
                z.writestr(name, duplicate[1])
    return out.getvalue()


def zip_members(data: bytes) -> dict:
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {info.filename: z.read(info) for info in z.infolist()}


def deflated_member(seed: bytes, rng: random.Random) -> bytes:
    """A real torch zip whose data.pkl is deflated, sometimes after growing it into a bomb (zeros after STOP, or a
    pickle of one huge bytes object)."""
    members = zip_members(seed)
    pkl = next(name for name in members if name.endswith("data.pkl"))
    if rng.random() < 0.5:
        size = rng.choice((1 << 20, 24 << 20))  # under and over the 16 MiB floor of torchzip.inflate_limit
        members[pkl] = (b"\x80\x03B" + struct.pack("<I", size) + bytes(size) + b".") if rng.random() < 0.5 \
            else members[pkl] + bytes(size)
    return torch_zip(members, deflated=(pkl,))


def duplicate_member(seed: bytes, rng: random.Random) -> bytes:
    """A real torch zip with one member written twice: a storage with other bytes, or another pickle."""
    members = zip_members(seed)
    name = rng.choice(list(members))
    other = bytes(rng.randrange(256) for _ in range(len(members[name]))) if rng.random() < 0.5 else \
        members[name][::-1]
    return torch_zip(members, duplicate=(name, other))


OUTSIDE = ("../decoy.safetensors", "{decoy}", "sub/../../decoy.safetensors", "./../decoy.safetensors", "..",
           "linked.safetensors", ".", "")


def outside_path(index: bytes, rng: random.Random, decoy: str) -> bytes:
    """A sharded index whose weight_map sends some tensors out of its folder: `..`, the decoy's absolute path, a
    link to it."""
    import json

    doc = json.loads(index)
    for key in rng.sample(sorted(doc["weight_map"]), rng.randint(1, min(3, len(doc["weight_map"])))):
        doc["weight_map"][key] = rng.choice(OUTSIDE).format(decoy=decoy)
    return json.dumps(doc).encode()


class Worker:
    """One process: a scratch dir, the unraisable hook, an audit hook that watches for the decoy being opened, and
    the commands called in-process."""

    def __init__(self, seeds: dict[str, str], scratch: str):
        import resource

        from ckpttool.errors import CkptError, UsageError
        from ckpttool.operations import inspect, verify

        self.seeds = {name: open(path, "rb").read() for name, path in seeds.items()}
        self.scratch = scratch
        self.decoy = os.path.join(os.path.dirname(scratch), os.path.basename(scratch) + "-decoy.safetensors")
        shutil.copyfile(seeds["safetensors"], self.decoy)
        self.opened_decoy: list[str] = []
        decoy = os.path.realpath(self.decoy)
        sys.addaudithook(lambda event, args: self.opened_decoy.append(event) if event == "open" and args
                         and isinstance(args[0], str) and os.path.realpath(args[0]) == decoy else None)
        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY, WORKER_MEMORY))
        signal.signal(signal.SIGALRM, _hung)
        self.expected = (CkptError, UsageError)
        self.inspect, self.verify = inspect.inspect, verify.verify
        self.commands = (self.inspect, self.verify, salvage)
        self.index_dir = os.path.join(scratch, "sharded")
        shutil.copytree(os.path.dirname(seeds["sharded_index"]), self.index_dir)
        os.symlink(self.decoy, os.path.join(self.index_dir, "linked.safetensors"))
        self.unraisable: list[str] = []
        sys.unraisablehook = lambda u: self.unraisable.append(f"{u.exc_type.__name__}: {u.exc_value}")
        # errors C code prints straight to stderr (PyErr_Print) are caught by pointing fd 2 at a file
        self.stderr = open(os.path.join(scratch, "stderr"), "w+b", buffering=0)
        os.dup2(self.stderr.fileno(), 2)

    def target(self, seed: str) -> str:
        if seed in ("sharded_index", "outside_path"):
            return os.path.join(self.index_dir, "model.safetensors.index.json")
        return os.path.join(self.scratch, "input.safetensors" if seed == "safetensors" else "input.pt")

    def build(self, seed: str, rng: random.Random) -> bytes:
        if seed == "shared_refs":
            return shared_refs(rng)
        if seed == "deflated_member":
            return deflated_member(self.seeds[rng.choice(("torch_training", "torch_cuda", "torch_malicious"))], rng)
        if seed == "duplicate_member":
            return duplicate_member(self.seeds[rng.choice(("torch_training", "torch_cuda"))], rng)
        if seed == "outside_path":
            return outside_path(self.seeds["sharded_index"], rng, self.decoy)
        return mutate(self.seeds[seed], rng)

    def run(self, base: int, index: int) -> tuple[str, str, str] | None:
        """None when every command ends in a result or the toolkit's own error, in time, without opening the decoy;
        else (seed, kind, detail)."""
        rng = random.Random(base * 1_000_003 + index)
        every = SEEDS + SHAPES
        seed = every[index % len(every)]
        path = self.target(seed)
        with open(path, "wb") as f:
            f.write(self.build(seed, rng))
        entry = path if seed not in ("sharded_index", "outside_path") else self.index_dir
        self.unraisable.clear()
        self.opened_decoy.clear()
        for command in self.commands:
            started = time.perf_counter()
            signal.alarm(3 * INPUT_SECONDS)  # a hang ends as an escape, not as a fuzz run that never finishes
            try:
                command(entry)
            except self.expected:
                pass
            except Exception as e:  # noqa: BLE001 - the escape being looked for (MemoryError past the limit too)
                frame = traceback.extract_tb(e.__traceback__)[-1]
                where = f"{os.path.basename(frame.filename)}:{frame.lineno}"
                return seed, f"{type(e).__name__} at {where}", str(e)[:100]
            finally:
                signal.alarm(0)
            spent = time.perf_counter() - started
            if spent > INPUT_SECONDS:
                return seed, f"slow {command.__name__}", f"{spent:.0f} s for one input"
            if self.opened_decoy:
                return seed, f"{command.__name__} opened a file outside the checkpoint", self.decoy
        printed = self._printed()
        if self.unraisable or printed:
            message = (self.unraisable or printed)[0]
            return seed, f"printed {message.split(':')[0]}", message[:100]
        return None

    def _printed(self) -> list[str]:
        sys.stderr.flush()
        if not os.fstat(self.stderr.fileno()).st_size:
            return []
        self.stderr.seek(0)
        lines = [line for line in self.stderr.read().decode(errors="replace").splitlines() if "Error" in line]
        self.stderr.seek(0)
        self.stderr.truncate()
        return lines


class Hung(Exception):
    """One command on one input ran past 3 x INPUT_SECONDS."""


def _hung(signum, frame):
    raise Hung(f"still running after {3 * INPUT_SECONDS} s")


def salvage(path: str):
    """What `repair` reads of a damaged file: its salvage reader, whatever the bytes (a folder: nothing to salvage)."""
    from ckpttool.formats import safetensors, torchsalvage

    if os.path.isfile(path):
        (safetensors.salvage if path.endswith(".safetensors") else torchsalvage.salvage)(path)


def _work(args) -> tuple[int, list]:
    seeds, base, indices = args
    scratch = tempfile.mkdtemp(prefix="ckpttool-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        worker = Worker(seeds, scratch)
        return len(indices), [(i, *found) for i in indices if (found := worker.run(base, i))]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if os.path.exists(scratch + "-decoy.safetensors"):
            os.remove(scratch + "-decoy.safetensors")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--only", type=int, help="replay one input (its number in a run with this --seed)")
    p.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    args = p.parse_args(argv)
    from fixtures.generate import MARKER_NAME, build

    root = tempfile.mkdtemp(prefix="ckpttool-fuzz-corpus-")
    try:
        corpus = build(root)
        seeds = seed_files(corpus)
        indices = [args.only] if args.only is not None else list(range(args.count))
        chunks = [(seeds, args.seed, indices[i::args.jobs * 8]) for i in range(min(len(indices), args.jobs * 8))]
        start = time.perf_counter()
        done, escapes = 0, []
        if args.jobs == 1:
            results = map(_work, chunks)
        else:
            pool = multiprocessing.get_context("spawn").Pool(args.jobs)
            results = pool.imap_unordered(_work, chunks)
        for n, found in results:
            done += n
            escapes.extend(found)
        elapsed = time.perf_counter() - start
        executed = os.path.exists(os.path.join(root, MARKER_NAME))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    kinds = collections.Counter((seed, kind) for _, seed, kind, _ in escapes)
    print(f"fuzz: {done} mutated inputs (seed {args.seed}), each through inspect, verify and salvage, in "
          f"{elapsed:.0f} s on {args.jobs} processes: {len(escapes)} escapes" + (", PAYLOAD EXECUTED" if executed else ""))
    for (seed, kind), count in kinds.most_common():
        first, detail = min((i, d) for i, s, k, d in escapes if (s, k) == (seed, kind))
        print(f"  {count:6d}  {seed}: {kind}: {detail}\n          replay: python -m fuzz --seed {args.seed} "
              f"--only {first}")
    return 1 if escapes or executed else 0

