"""`ckpttool manifest`: xxh3-128 checksums of a checkpoint's files (in pieces) and of each tensor's bytes, written
beside or inside it (where, and how they are computed: `ckpttool.checksums`)."""

from __future__ import annotations

import datetime
import json
import os

import xxhash

from ckpttool import __version__, atomic, distributed, hashing, steps, trainers
from ckpttool.checkpoint import open_checkpoint
from ckpttool.checksums import (
    VERSION,
    covered_files,
    crc_problems,
    hash_files,
    hash_tensors,
    manifest_path,
    tensor_ranges,
)
from ckpttool.errors import CkptError, UsageError
from ckpttool.model import ERROR, Checkpoint, Code

# a manifest of a broken checkpoint, or of one holding a link out or a FIFO, would bless the damage
BLOCKING = (Code.TRUNCATED, Code.CORRUPT, Code.MISSING_FILE, Code.UNSAFE_PATH)


def build(ckpt: Checkpoint) -> dict:
    """The manifest document of a readable checkpoint."""
    broken = [p for p in ckpt.problems if p.code in BLOCKING and p.severity == ERROR]
    if broken:
        first = broken[0]
        raise CkptError(first.code, f"not writing a manifest for a broken checkpoint: {first.message} "
                        f"({first.path}); run `ckpttool verify` for the full list", ckpt.path)
    own = trainers.profile_of(ckpt).own_manifest(ckpt)  # the trainer's own manifest (Megatron's integrity.json)
    if own is not None and (differ := [p for p in own[1] if p.severity == ERROR]):
        raise CkptError(differ[0].code, f"not writing a manifest for a checkpoint that differs from {own[0]}, the "
                        f"trainer's own: {differ[0].message} ({differ[0].path})", ckpt.path)
    damaged, _ = crc_problems(ckpt)
    if damaged:
        raise CkptError(Code.CORRUPT, f"not writing a manifest for a damaged checkpoint: {damaged[0].message} "
                        f"({damaged[0].path}); run `ckpttool verify` for the full list", ckpt.path)
    folder = os.path.dirname(manifest_path(ckpt))
    covered = covered_files(ckpt)
    files = hash_files(covered)
    # tensors of the files it covers only: a part the reader takes from beside the folder (torchtune's recipe_state/
    # of an epoch_N folder) is another save's, and a manifest's paths stay inside its folder
    inside = {os.path.abspath(f) for f in covered}
    tensors = [t for t in tensor_ranges(ckpt, folder) if os.path.abspath(os.path.join(folder, t["file"])) in inside]
    for entry, digest in zip(tensors, hash_tensors(tensors, folder)):
        entry[hashing.ALGORITHM] = digest
    doc = {
        "ckpttool_manifest": VERSION,
        "tool": f"ckpttool {__version__}",
        "created": _created(),
        "algorithm": hashing.ALGORITHM,
        "piece_size": hashing.PIECE_SIZE,
        "format": ckpt.format,
        "layout": ckpt.layout,
        "step": steps.global_step(ckpt),
        "crcs_checked": True,  # every zip CRC held when it was written: verify need not check them while bytes match
        "files": {os.path.relpath(p, folder): info for p, info in files.items()},
        "tensors": tensors,
    }
    return doc


def _created() -> str:
    """Now, or SOURCE_DATE_EPOCH when set (the reproducible-builds convention): two runs then write the same bytes."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "")
    when = (datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc) if epoch.isdigit() else
            datetime.datetime.now(datetime.timezone.utc))
    return when.isoformat(timespec="seconds")


def write(path: str, force: bool = False, staged_dir: bool = False, writer: bool | None = None) -> dict:
    """Write the manifest for `path`; an existing one is replaced only with `force`. `staged_dir`: `path` is a folder
    still being staged by its writer (a trainer's `checkpoint-N.tmp`), so the manifest is written straight into it
    under its own name: the folder's rename publishes it, and no temporary name of its own ever appears. `writer`:
    whether this process writes it (None: rank 0 of a torchrun launch, or the only process; a trainer's hook that
    picked the one process to seal its save passes True)."""
    from ckpttool.formats.pretrained import hf_cache
    from ckpttool.operations import verify_cache

    before = verify_cache.listings(path) if verify_cache.cache_dir() else None  # listed before anything is read
    ckpt = open_checkpoint(path)
    target = manifest_path(ckpt)
    hub = ckpt.metadata.get("hf_cache") or hf_cache(target)
    if hub:
        raise UsageError(f"{path}: a Hugging Face cache snapshot ({hub['repo_id']} at revision {hub['revision']}); "
                         "ckpttool writes nothing into the cache: copy it out (cp -rL) and write the manifest there")
    if os.path.exists(target) and not force:
        raise UsageError(f"{target}: a manifest already exists; pass --force to replace it (verify first if "
                         "you are not sure the checkpoint is still intact)")
    doc = build(ckpt)
    text = json.dumps(doc, indent=1) + "\n"
    result = {"manifest": target, "files": len(doc["files"]), "tensors": len(doc["tensors"]),
              "bytes": sum(f["size"] for f in doc["files"].values()), "step": doc["step"]}
    if not (distributed.is_leader() if writer is None else writer):  # under torchrun every rank hashed its share
        return result
    if staged_dir:
        data = text.encode("utf-8")
        with atomic.guard(target, len(data)):
            atomic.write_synced(target, data)
    else:
        atomic.write_text(target, text)
        _remember_reports(path, ckpt, target, doc, text.encode("utf-8"), before)
    return result


def _remember_reports(path: str, ckpt: Checkpoint, target: str, doc: dict, data: bytes, before: dict | None):
    """Every byte was just parsed, CRC-checked and hashed: hand verify's cache the reports (without and with
    --for-resume) that a verify gives while the bytes match, so the first verify after this one is a hash."""
    from ckpttool.operations import verify, verify_cache

    if before is None:
        return
    folder, name = os.path.split(target)
    with_manifest = {f: sorted({*names, name}) if f == folder else names for f, names in before.items()}
    for for_resume in (False, True):
        report = verify.report_while_matching(path, ckpt, target, doc, for_resume=for_resume)
        verify_cache.remember(report, ckpt, (target, doc, xxhash.xxh3_128_hexdigest(data)), path, with_manifest,
                              expect_step=None, for_resume=for_resume, finite=False)
