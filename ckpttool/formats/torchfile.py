"""torch.save files (.pt .pth .bin .ckpt), read through the safe pickle reader: the reader of the format, and the scan
of pickle files nobody loads on resume.

Only the pickle and the zip directory are read; each tensor becomes a `TensorInfo` that points at its storage's
bytes. The container is read by `torchzip` (zip, torch >= 1.6) or `torchlegacy`; what the object holds (a training
dict's components, its counters) by `torchtree`; `torchwriter` writes the format.
"""

from __future__ import annotations

import io
import os
import re
import zipfile

from ckpttool import paths
from ckpttool.errors import CkptError
from ckpttool.formats import TORCH_SUFFIXES, ZIP_MAGIC
from ckpttool.formats.pickles import SAFE_GLOBALS, SCAN_OPCODES, UNSCANNED, RawPickle, TensorRef
from ckpttool.formats.torchlegacy import read_legacy
from ckpttool.formats.torchtree import analyse, tensor_info
from ckpttool.formats.torchzip import PICKLE_SUFFIXES, ZIP_ERRORS, Window, other_pickles_globals, read_zip
from ckpttool.model import ERROR, WARNING, Checkpoint, Code, Location, Problem, TensorInfo, uncarried_tensors

SUFFIXES = TORCH_SUFFIXES


def detect(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    if path.endswith(SUFFIXES):
        return True
    with open(path, "rb") as f:
        head = f.read(4)
    return head == ZIP_MAGIC or head[:1] == b"\x80"


def read_raw(path: str, allowed=SAFE_GLOBALS, span: tuple[int, int] | None = None, data: bytes | None = None
             ) -> RawPickle:
    """The file's pickle and storages; with `span` (offset, length), of a torch.save blob embedded in the file (a DCP
    item), with storage offsets still counted from the start of the file; with `data`, of a blob in memory (`path`
    then only names it in errors)."""
    if data is None:
        paths.regular(path)
    size = len(data) if data is not None else span[1] if span else os.path.getsize(path)
    opener = ((lambda: io.BytesIO(data)) if data is not None else (lambda: Window(path, *span)) if span else
              (lambda: open(path, "rb")))
    with opener() as f:
        head = f.read(4)
    if not head:
        raise CkptError(Code.TRUNCATED, "file is empty (0 bytes): the save or download that made it wrote nothing",
                        path)
    try:
        if head == ZIP_MAGIC:
            return read_zip(path, size, allowed, opener, base=span[0] if span else 0)
        if span or data is not None:
            raise CkptError(Code.CORRUPT, "the embedded item is not a torch.save archive", path)
        return read_legacy(path, size, allowed)
    except (OSError, ValueError, OverflowError, MemoryError) as e:  # offsets and sizes a damaged file made absurd
        raise CkptError(Code.CORRUPT, f"cannot be read as a torch file ({type(e).__name__}: {e})", path) from None


def globals_of(path: str) -> tuple[list[str], bool]:
    """(every global the pickles of a torch or pickle file name, whether they were walked to the end), damaged or
    not, read as opcodes (pickles.scan_opcodes): for a file a checkpoint holds but its resume never loads
    (transformers' training_args.bin), which other tools, older library versions and torch.load(weights_only=False)
    still unpickle."""
    from ckpttool.formats.pickles import scan_opcodes

    with open(path, "rb") as raw:
        if raw.read(4) != ZIP_MAGIC:
            raw.seek(0)
            return scan_opcodes(raw)
        try:
            members = zipfile.ZipFile(raw).infolist()
        except ZIP_ERRORS:
            return [], True  # no directory to find the members by: the pickle is unreachable for torch.load too
        names = other_pickles_globals(raw, members, [SCAN_OPCODES])
        return [n for n in dict.fromkeys(names) if n != UNSCANNED], UNSCANNED not in names


# Classes a checkpoint's own metadata pickles hold as data (transformers' training_args.bin: TrainingArguments, its
# enums and dataclasses, Accelerate's state); any other global a file nobody reads on resume names is worth a word.
INERT_PREFIXES = ("transformers.training_args", "transformers.trainer_utils.", "transformers.trainer_pt_utils.",
                  "transformers.integrations.deepspeed.Hf", "trl.trainer.", "accelerate.state.",
                  "accelerate.utils.dataclasses.", "peft.utils.peft_types.", "enum.", "torch.device", "torch.dtype",
                  "argparse.Namespace", "pathlib.", "datetime.", "collections.", "copyreg._reconstructor",
                  "builtins.object", "builtins.set", "builtins.frozenset", "builtins.slice", "builtins.complex",
                  "builtins.bytearray")


def code_in_files(files: list[str], folder: str) -> list:
    """Problems of the pickle files among `files` (by name or first byte), read as opcodes: a global that runs code
    when unpickled (pickles.runs_code) is `unsafe_pickle`, an error; a global ckpttool does not know to be inert, or
    a pickle too long to walk to its end, a warning of that code."""
    from ckpttool.formats.pickles import SAFE_GLOBALS, runs_code

    found = []
    for full in files:
        with open(full, "rb") as f:
            head = f.read(4)
        if not (full.endswith(SUFFIXES + PICKLE_SUFFIXES) or head == ZIP_MAGIC or head[:1] == b"\x80"):
            continue
        names, complete = globals_of(full)
        rel = os.path.relpath(full, folder)
        code = [g for g in names if runs_code(g)]
        unknown = [g for g in names if g not in SAFE_GLOBALS and not runs_code(g) and not g.startswith(INERT_PREFIXES)]
        if code:
            found.append(Problem(Code.UNSAFE_PICKLE, ERROR, f"{rel} imports {', '.join(code)}, which runs code when "
                                 "unpickled: the resume does not load it, but torch.load(weights_only=False), older "
                                 "library versions and other tools do; it was not executed. Delete it if you did not "
                                 "put it there", full))
        elif unknown:
            found.append(Problem(Code.UNSAFE_PICKLE, WARNING, f"{rel} names {', '.join(unknown[:8])}, which ckpttool "
                                                              "does "
                                 "not know to be inert: the resume does not load it, but pickle.load would import and "
                                 "may call them; it was not executed", full))
        elif not complete:
            found.append(Problem(Code.UNSAFE_PICKLE, WARNING, f"{rel} is too long to scan to its end (4,000,000 "
                                                              "opcodes): "
                                 "the resume does not load it, but pickle.load would, and what lies past that point "
                                 "was not looked at", full))
    return found


# --- structure: from the unpickled object to components and step sources ---


def read(path: str, *, role: str | None = None, name: str | None = None) -> Checkpoint:
    """`role`: what the file is as part of a larger checkpoint (None: what its contents say); `name`: its component's
    name there."""
    raw = read_raw(path)
    components, steps, metadata, extras = analyse(raw, path, role=role, name=name)
    ckpt = Checkpoint(path, "torch", raw.layout, components=components, steps=steps, metadata=metadata,
                      files=[path], extras=extras)
    note_pickle(ckpt, raw, path)
    if uncarried := uncarried_tensors(components):
        ckpt.add_problem(Code.UNSUPPORTED_LAYOUT, WARNING, f"{uncarried}; torch.load gives them, their values are not "
                         "checked, and convert, remap, average and diff refuse this file rather than drop them", path)
    return ckpt


def note_pickle(ckpt: Checkpoint, raw: RawPickle, path: str):
    """Record the globals a pickle names, its unsafe ones as a problem, and the devices it was saved from."""
    from ckpttool.formats.pickles import classify, inert_problem, own_classes_problem

    ckpt.pickle_globals.extend(g for g in raw.globals_seen if g not in ckpt.pickle_globals)
    unsafe, inert, own = classify(raw.unsafe_globals, raw.called, raw.runs_methods)
    # numpy arrays, scalars and dtypes: read here as plain data, but off torch's own weights_only list
    inert += [g for g in refused_by_weights_only(raw) if g.startswith("numpy.") and g not in raw.unsafe_globals]
    if unsafe:
        ckpt.add_problem(Code.UNSAFE_PICKLE, ERROR,
                         f"pickle imports {', '.join(unsafe)}, outside the allow-list: torch.load "
                         "would run that code (or refuse with weights_only); it was not executed. Load it only if "
                         "you trust its source, or re-save the tensors with `ckpttool convert`", path)
    if inert:
        ckpt.problems.append(inert_problem(inert, "the pickle", path))
    if own:
        ckpt.problems.append(own_classes_problem(own, "the pickle", path))
    devices = sorted({ref.location for ref, _ in raw.storages.values()})
    if devices:
        known = set(ckpt.metadata.get("saved_on_devices", []))
        ckpt.metadata["saved_on_devices"] = sorted(known | set(devices))


def refused_by_weights_only(raw: RawPickle) -> list[str]:
    """The globals of a pickle that torch.load(weights_only=True) refuses by default, with the numpy.dtypes classes
    of the dtypes it builds (checked by torch though no GLOBAL names them): what `add_safe_globals` must list."""
    from ckpttool.formats.pickles import TORCH_WEIGHTS_ONLY

    refused = [g for g in raw.globals_seen if g not in TORCH_WEIGHTS_ONLY]
    return refused + (numpy_dtype_classes(raw.obj) if "numpy.dtype" in refused else [])


DTYPE_WALK = 1_000_000  # objects looked at for numpy dtypes
# a numpy dtype's pickled name (numpy.dtype's first argument): numbers, bools, strings, bytes, datetimes, objects,
# records; anything else is never handed to numpy
DTYPE_CODE = re.compile(r"[<>|=]?(?:[biufcUSaVmMO?](?:[0-9]{1,4})?(?:\[[0-9]{0,4}[a-zA-Z]{1,2}\])?)")


def numpy_dtype_classes(obj) -> list[str]:
    """The numpy.dtypes classes of the dtypes a pickle builds: torch's weights_only load checks each dtype's class
    (`numpy.dtypes.UInt32DType` for an RNG state's key array), which no GLOBAL of the pickle names."""
    import numpy

    from ckpttool.formats.pickles import Opaque

    found, stack, seen = [], [obj], set()
    while stack and len(seen) < DTYPE_WALK:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
        elif isinstance(node, Opaque):
            code = node.args[0] if node.global_name == "numpy.dtype" and node.args else None
            if isinstance(code, str) and DTYPE_CODE.fullmatch(code):
                name = f"numpy.dtypes.{type(numpy.dtype(code)).__name__}"
                if name not in found:
                    found.append(name)
            stack.extend([node.args, node.state, node.items, node.entries])
    return found


def saved_tensor(name: str, loc: Location, shape) -> TensorInfo:
    """A DCP item (a whole torch.save blob inside a data file) as the tensor it holds, its storage located by the safe
    reader without torch. CkptError when the blob is damaged or does not hold a `shape` tensor."""
    try:
        raw = read_raw(loc.file, span=(loc.offset, loc.length))
    except CkptError as e:
        raise CkptError(e.code, f"tensor {name}: the piece at byte {loc.offset} cannot be read ({e.reason})",
                        loc.file) from None
    if not isinstance(raw.obj, TensorRef) or tuple(raw.obj.shape) != tuple(shape):
        raise CkptError(Code.CORRUPT, f"tensor {name}: the piece at byte {loc.offset} is not a {tuple(shape)} tensor",
                        loc.file)
    return tensor_info(name, raw.obj, raw, loc.file)
