"""Faults and safety: full and read-only disks on every write path, output modes under the umask, staging left by
killed runs, pickles that run code in any record, malformed zip members, and the volume fuzzer."""

import errno
import hashlib
import io
import os
import pickle
import resource
import subprocess
import sys
import time
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from ckpttool import atomic
from ckpttool.errors import CkptError
from ckpttool.formats import torchfile, torchwriter, torchzip
from ckpttool.formats.pickles import unpickle
from ckpttool.operations import convert
from tests.helpers import cli, copy

CKPTTOOL = [sys.executable, "-m", "ckpttool"]


def digest(path):
    if os.path.isdir(path):
        return {f: digest(os.path.join(path, f)) for f in sorted(os.listdir(path))}
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def run_limited(args, file_size_limit, cwd):
    """A ckpttool command with RLIMIT_FSIZE, as on a disk that fills: writes past it fail with EFBIG."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    return subprocess.run(CKPTTOOL + args, cwd=cwd, capture_output=True, text=True, preexec_fn=limit, timeout=120)


@pytest.fixture
def inputs(tmp_path):
    torch.manual_seed(0)
    tensors = {f"w{i}": torch.randn(128, 128) for i in range(8)}
    save_file(tensors, tmp_path / "in.safetensors")
    torch.save(tensors, tmp_path / "in.pt")
    return tmp_path


# --- writes that cannot complete ---

FULL_DISK_WRITES = [
    ["convert", "in.safetensors", "out.pt"],
    ["convert", "in.pt", "out.safetensors"],
    ["convert", "in.pt", "out_dir", "--to", "accelerate"],
    ["convert", "in.pt", "out_dcp", "--to", "dcp"],
    ["remap", "in.pt", "out.safetensors", "--add-prefix", "model."],
    ["remap", "in.safetensors", "out.pt", "--add-prefix", "model."],
    ["average", "in.safetensors", "in.pt", "out.safetensors"],
    ["average", "in.safetensors", "in.pt", "out.pt"],
]
SHARDED = ["convert", "in.safetensors", "out_sharded", "--shard-size", "300KB"]  # each shard stays under 524,000


# early, and within the last buffered write (closing fails too)
@pytest.mark.parametrize("args, limit", [(a, 200_000) for a in FULL_DISK_WRITES + [SHARDED]] +
                         [(a, 524_000) for a in FULL_DISK_WRITES])
def test_a_full_disk_is_one_line_exit_1_and_leaves_nothing(inputs, args, limit):
    before = digest(inputs)
    proc = run_limited(args, limit, inputs)  # the inputs are 512 KiB: every output crosses the limit
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr and "c10" not in proc.stderr, proc.stderr
    output = args[-1] if args[0] == "average" else args[2]
    assert lines[0].startswith(f"ckpttool: {output}: cannot write the output: the file is larger than the file-size "
                               "limit allows"), lines[0]
    assert "the output needs about 512.0 KiB" in lines[0] and "free in" in lines[0]
    assert digest(inputs) == before  # inputs unchanged, no output and no staging left
    assert sorted(os.listdir(inputs)) == ["in.pt", "in.safetensors"]


def test_manifest_on_a_full_disk(inputs):
    proc = run_limited(["manifest", "in.pt"], 1_000, inputs)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "in.pt.ckpttool-manifest.json: cannot write the output" in proc.stderr
    assert sorted(os.listdir(inputs)) == ["in.pt", "in.safetensors"]


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "the disk is full"),
                                          (errno.EROFS, "the filesystem is read-only"),
                                          (errno.EACCES, "permission denied")])
def test_no_space_read_only_and_no_permission(inputs, monkeypatch, code, reason):
    real_write = os.write

    def failing_write(fd, data):
        if len(data) > 1000:
            raise OSError(code, os.strerror(code))
        return real_write(fd, data)

    def failing_copy(src, dst, count, offset_src=None, offset_dst=None):  # the kernel's copy hits the same disk
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "write", failing_write)
    monkeypatch.setattr(os, "copy_file_range", failing_copy)
    with pytest.raises(atomic.OutputError) as caught:
        convert.convert(str(inputs / "in.safetensors"), str(inputs / "out.pt"))
    assert str(caught.value).startswith(f"{inputs / 'out.pt'}: cannot write the output: {reason}")
    assert sorted(os.listdir(inputs)) == ["in.pt", "in.safetensors"]


def test_a_read_only_folder_is_named(inputs, monkeypatch):
    def refuse(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(os, "mkdir", refuse)
    with pytest.raises(atomic.OutputError, match="permission denied.*write to a folder you can write to"):
        convert.convert(str(inputs / "in.pt"), str(inputs / "out.safetensors"))


def test_an_unreadable_input_is_not_blamed_on_the_output(inputs, monkeypatch):
    with pytest.raises(OSError) as caught:
        with atomic.guard(str(inputs / "out.pt"), 10):
            raise PermissionError(errno.EACCES, "Permission denied", str(inputs / "in.pt"))
    assert not isinstance(caught.value, atomic.OutputError)


def test_the_trainer_on_a_full_disk_stops_cleanly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trainer", "--output-dir", str(tmp_path), "--max-steps", "4",
                           "--checkpointing-steps", "2", "--batch-size", "8"], capture_output=True, text=True,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000)),
                          timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert f"[trainer] cannot save: {tmp_path / 'checkpoint-2'}: cannot write the output" in proc.stderr
    assert os.listdir(tmp_path) == []  # checkpoint-2.tmp removed


# --- modes and staging ---

@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_get_the_mode_a_plain_file_gets(inputs, umask):
    env_cmd = f"umask {umask:03o} && " + " && ".join([
        "{py} -m ckpttool convert in.pt out.safetensors", "{py} -m ckpttool convert in.safetensors out.pt",
        "{py} -m ckpttool convert in.pt out_dir --to accelerate",
        "{py} -m ckpttool remap in.pt remapped.safetensors --add-prefix m.",
        "{py} -m ckpttool manifest out.safetensors"]).format(py=sys.executable)
    proc = subprocess.run(["bash", "-c", env_cmd], cwd=inputs, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in ("out.safetensors", "out.pt", "remapped.safetensors", "out.safetensors.ckpttool-manifest.json",
                 "out_dir/model.safetensors"):
        assert oct(os.stat(inputs / name).st_mode & 0o777) == oct(0o666 & ~umask), name
    assert oct(os.stat(inputs / "out_dir").st_mode & 0o777) == oct(0o777 & ~umask)


def _leftover(folder, target, pid, age_s):
    path = folder / f".{target}.ckpttool-{pid}-abc123.tmp"
    path.mkdir()
    (path / "part").write_bytes(b"x" * 10)
    old = time.time() - age_s
    os.utime(path / "part", (old, old))
    os.utime(path, (old, old))
    return path


def test_the_next_write_to_a_destination_removes_a_killed_runs_staging(inputs):
    dead = _leftover(inputs, "out.pt", 2 ** 22 + 7, 3600)  # no such pid, untouched for an hour: killed
    recent = _leftover(inputs, "out.pt", 2 ** 22 + 9, 0)  # touched just now: maybe another node's live writer
    mine = _leftover(inputs, "out.pt", os.getpid(), 3600)  # a live process
    other = _leftover(inputs, "other.pt", 2 ** 22 + 7, 3600)  # another destination's: not ours to touch
    convert.convert(str(inputs / "in.safetensors"), str(inputs / "out.pt"))
    assert not dead.exists() and recent.exists() and mine.exists() and other.exists()


def test_prune_removes_stale_staging(runs, tmp_path):
    run = copy(runs["transformers"], tmp_path)
    dead = _leftover(tmp_path / os.path.basename(run), "checkpoint-9", 2 ** 22 + 7, 3600)
    report, _ = cli("prune", run, "--keep", "5", "--dry-run", "--json")
    assert report.exit_code == 0 and dead.exists()
    report, doc = cli("prune", run, "--keep", "5", "--json")
    assert doc["stale_staging"] == [str(dead)] and not dead.exists()


def test_convert_of_an_input_without_tensors_exits_1(tmp_path):
    torch.save({"epoch": 3, "note": "no tensors here"}, tmp_path / "empty.pt")
    result, _ = cli("convert", str(tmp_path / "empty.pt"), str(tmp_path / "out.pt"))
    assert result.exit_code == 1 and "holds no tensors" in result.stderr and "[no_tensors]" in result.stderr
    assert not (tmp_path / "out.pt").exists()


# --- the archive writer ---

def test_archive_writer_output_loads_in_torch_every_way(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(10), "c": torch.randn(5).to(torch.bfloat16),
               "empty": torch.zeros(0), "scalar": torch.tensor(3.5), "flags": torch.tensor([True, False])}
    specs = [(k, str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in tensors.items()]
    writer = torchwriter.Writer(str(tmp_path / "w.pt"), specs)
    for k, v in tensors.items():
        writer.write(k, v)
    writer.close()
    for mmap in (False, True):
        loaded = torch.load(tmp_path / "w.pt", weights_only=True, mmap=mmap)
        assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in tensors.items())
    with zipfile.ZipFile(tmp_path / "w.pt") as zf:
        assert zf.testzip() is None
        with open(tmp_path / "w.pt", "rb") as raw:
            for info in zf.infolist():
                assert torchzip.zip_data_offset(raw, info, "w.pt") % 64 == 0  # torch's alignment


def test_archive_writer_zip64_directory_past_65535_members(tmp_path):
    count = 66_000
    specs = [(f"t{i}", "float32", (1,)) for i in range(count)]
    writer = torchwriter.Writer(str(tmp_path / "many.pt"), specs)
    for i in range(count):
        writer.write(f"t{i}", torch.tensor([float(i)]))
    writer.close()
    loaded = torch.load(tmp_path / "many.pt", weights_only=True, mmap=True)
    assert len(loaded) == count and loaded["t65999"].item() == 65999.0


# --- pickles that run code ---

def test_legacy_sys_info_payload_is_unsafe_everywhere(corpus, no_payload, tmp_path):
    for name in ("torch_legacy_sys_info_payload", "torch_legacy_sys_info_payload_empty"):
        path = corpus[name]
        result, doc = cli("inspect", path, "--json")
        assert result.exit_code == 1 and [p["code"] for p in doc["problems"]] == ["unsafe_pickle"]
        assert "posix.system" in doc["problems"][0]["message"] or "os.system" in doc["problems"][0]["message"]
        result, doc = cli("verify", path, "--json")
        assert not doc["ok"] and {c["check"]: c["status"] for c in doc["checks"]}["pickle safety"] == "fail"
    result, _ = cli("convert", corpus["torch_legacy_sys_info_payload_empty"], str(tmp_path / "out.pt"))
    assert result.exit_code == 1 and "holds no tensors" in result.stderr
    result, _ = cli("convert", corpus["torch_legacy_sys_info_payload"], str(tmp_path / "out.pt"))
    assert result.exit_code == 0  # the tensors are re-saved; the payload is not carried over (nor run)
    assert not torchfile.read_raw(str(tmp_path / "out.pt")).unsafe_globals


def test_the_sys_info_payload_is_real(corpus, tmp_path):
    """The fixture's kind of file is a real threat: torch.load(weights_only=False) runs its sys_info record."""
    from fixtures.generate import _legacy_sys_info_payload, _Payload

    marker = tmp_path / "ran"
    _legacy_sys_info_payload(corpus["torch_legacy"], tmp_path / "threat.pt", _Payload(str(marker)))
    assert torchfile.read_raw(str(tmp_path / "threat.pt")).unsafe_globals == ["posix.system"]
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(tmp_path / 'threat.pt')!r}, "
                    "weights_only=False)"], capture_output=True, timeout=60)
    assert marker.exists()


def _zip_with(members: list[tuple[str, bytes, int]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data, method in members:
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=method)
    return buffer.getvalue()


def _payload_pickle() -> bytes:
    return b"\x80\x02cposix\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03."


def test_torch_reads_the_first_folders_data_pkl_and_so_does_the_reader(tmp_path):
    benign = pickle.dumps({"epoch": 1}, protocol=2)
    path = tmp_path / "two.pt"
    path.write_bytes(_zip_with([("evil/version", b"3\n", zipfile.ZIP_STORED),
                                ("archive/data.pkl", benign, zipfile.ZIP_STORED),
                                ("evil/data.pkl", _payload_pickle(), zipfile.ZIP_STORED)]))
    assert torchfile.read_raw(str(path)).unsafe_globals == ["posix.system"]


def test_a_deflated_data_pkl_is_read_and_scanned(tmp_path):
    path = tmp_path / "deflated.pt"
    path.write_bytes(_zip_with([("archive/data.pkl", _payload_pickle(), zipfile.ZIP_DEFLATED)]))
    assert torchfile.read_raw(str(path)).unsafe_globals == ["posix.system"]


def test_other_pkl_members_are_scanned(corpus, tmp_path):
    path = tmp_path / "extra.pt"
    with open(corpus["torch_state_dict"], "rb") as f:
        data = f.read()
    path.write_bytes(data)
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("state_dict/extra/hidden.pkl", _payload_pickle())
    result, doc = cli("inspect", str(path), "--json")
    assert result.exit_code == 1 and "posix.system" in doc["problems"][0]["message"]


def test_a_payload_before_damage_is_still_unsafe():
    with pytest.raises(CkptError) as caught:
        unpickle(_payload_pickle()[:-1] + b"\xff")
    assert caught.value.code == "unsafe_pickle" and "posix.system" in str(caught.value)


def test_a_forged_memo_index_costs_no_memory():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    obj, _ = unpickle(b"\x80\x02]r\xff\xff\xff\x3fj\xff\xff\xff\x3f.")  # LONG_BINPUT, LONG_BINGET 2**30-1
    assert obj == []
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 512 * 1024  # KiB: the C unpickler took 16 GB


# --- malformed zip members (the classes the volume fuzzer found), by hypothesis ---

LOCAL_FIELDS = {"flags": (6, 2), "method": (8, 2), "crc": (14, 4), "compressed": (18, 4), "size": (22, 4),
                "name_length": (26, 2), "extra_length": (28, 2)}
CENTRAL_FIELDS = {"flags": (8, 2), "method": (10, 2), "crc": (16, 4), "compressed": (20, 4), "size": (24, 4),
                  "name_length": (28, 2), "extra_length": (30, 2), "offset": (42, 4)}
VALUES = st.one_of(st.sampled_from([0, 1, 8, 9, 12, 14, 99, 0xFFFF, 0xFFFFFFFF]), st.integers(0, 2 ** 32 - 1))


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(["torch_training", "torch_numpy_rng", "torch_cuda"]),
       record=st.sampled_from(["local", "central"]), field=st.sampled_from(sorted(CENTRAL_FIELDS)),
       member=st.integers(0, 8), value=VALUES, flip_flag=st.sampled_from([None, 0x1, 0x8, 0x800, 0x40]))
def test_zip_field_edits_end_in_the_toolkits_own_errors(corpus, tmp_path, no_payload, which, record, field, member,
                                                        value, flip_flag):
    data = bytearray(open(corpus[which], "rb").read())
    signature = b"PK\x03\x04" if record == "local" else b"PK\x01\x02"
    starts = [i for i in range(len(data) - 4) if data[i:i + 4] == signature]
    start = starts[member % len(starts)]
    fields = LOCAL_FIELDS if record == "local" else CENTRAL_FIELDS
    offset, width = fields.get(field, fields["flags"])
    if flip_flag is not None:
        offset, width = fields["flags"]
        value = int.from_bytes(data[start + offset:start + offset + 2], "little") ^ flip_flag
    data[start + offset:start + offset + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    path = tmp_path / "edited.pt"
    path.write_bytes(bytes(data))
    for command in ("inspect", "verify"):
        result, _ = cli(command, str(path))
        assert result.exit_code in (0, 1) and "internal error" not in result.stderr, result.stderr


@pytest.mark.parametrize("field, value, expected", [
    ("flags", 0x1, "is marked encrypted"), ("method", 8, "cannot be inflated"), ("method", 99, "compression method 99"),
])
def test_each_zip_member_fault_names_the_member(corpus, tmp_path, field, value, expected):
    data = bytearray(open(corpus["torch_training"], "rb").read())
    start = data.index(b"PK\x01\x02")  # the central entry of data.pkl, the first member
    offset, width = CENTRAL_FIELDS[field]
    old = int.from_bytes(data[start + offset:start + offset + width], "little")
    new = old | value if field == "flags" else value
    data[start + offset:start + offset + width] = new.to_bytes(width, "little")
    path = tmp_path / "bad.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(CkptError) as caught:
        torchfile.read_raw(str(path))
    assert caught.value.code == "corrupt" and "training/data.pkl" in str(caught.value) and expected in str(caught.value)


def test_a_local_header_naming_another_file_is_corrupt(corpus, tmp_path):
    data = bytearray(open(corpus["torch_training"], "rb").read())
    name_at = 30  # the first local header's name: training/data.pkl
    data[name_at] = ord("X")
    path = tmp_path / "renamed.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(CkptError, match="local header of training/data.pkl names another file"):
        torchfile.read_raw(str(path))


# --- the volume fuzzer, bounded ---

def test_volume_fuzzer_finds_no_escape(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fuzz", "--count", "3000", "--seed", "7"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3000 mutated inputs (seed 7)" in proc.stdout and ": 0 escapes" in proc.stdout


def test_the_inputs_that_escaped_before_are_clean_now():
    """Inputs the fuzzer reported on the old reader: the zipfile RuntimeError (encrypted flag) and the
    'deallocated bytearray object has exported buffers' print (C unpickler on a damaged legacy stream)."""
    for index in (20092, 29999):
        proc = subprocess.run([sys.executable, "-m", "fuzz", "--seed", "1", "--only", str(index), "--jobs", "1"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and ": 0 escapes" in proc.stdout, proc.stdout + proc.stderr


# --- the techniques of picklescan's and modelscan's test payloads, re-created (their files are not redistributed;
# benchmarks/bench_scanners.py runs the originals) ---

def _flag_zip(flag: int, name="data.pkl", crc_off=False, local_name=None) -> bytes:
    data = bytearray(_zip_with([(name, _payload_pickle(), zipfile.ZIP_STORED)]))
    central = data.index(b"PK\x01\x02")
    for at in (6, central + 8):  # the flags of the local header and of the central entry
        data[at:at + 2] = (int.from_bytes(data[at:at + 2], "little") | flag).to_bytes(2, "little")
    if crc_off:
        data[central + 16] ^= 0xFF
    if local_name:
        data[30:30 + len(local_name)] = local_name
    return bytes(data)


@pytest.mark.parametrize("name, content", [
    ("encrypted_flag.zip", lambda: _flag_zip(0x1)),  # picklescan malicious1_0x1.zip
    ("patched_flag.zip", lambda: _flag_zip(0x20)),  # malicious1_0x20.zip
    ("strong_encryption_flag.zip", lambda: _flag_zip(0x40)),  # malicious1_0x40.zip
    ("bad_crc.zip", lambda: _flag_zip(0, crc_off=True)),  # data2/malicious1_crc.zip
    ("renamed_local_header.zip", lambda: _flag_zip(0, local_name=b"xxxx.pkl")),  # malicious1_central_directory.zip
    ("wrong_ext.zip", lambda: _zip_with([("data.txt", _payload_pickle(), zipfile.ZIP_STORED)])),  # wrong_ext.zip
    ("second_pickle.pkl", lambda: pickle.dumps(["a", "b"], protocol=4) + _payload_pickle()),  # malicious6.pkl
    ("magic_bypass.pt", lambda: b"\x80\x02c__builtin__\neval\nX\x16\x00\x00\x000x1950A86A20F9469CFC6C\x85R."
     + _payload_pickle()),  # pytorch_magic_bypass.pt: the magic number computed by eval, then the payload
])
def test_scanner_corpus_techniques_are_unsafe(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content())
    target = str(path) if not name.endswith(".zip") else str(path.with_suffix(".pt"))
    os.replace(path, target)
    result, doc = cli("inspect", target, "--json")
    assert "unsafe_pickle" in [p["code"] for p in doc["problems"]], doc["problems"]
    result, doc = cli("verify", target, "--json")
    assert not doc["ok"] and "unsafe_pickle" in [p["code"] for p in doc["problems"]]


def test_benign_training_pickles_raise_no_alarm(corpus, runs):
    """Accelerate's RNG states (numpy state, allow-listed as Accelerate allow-lists it) are clean in their dir, and
    alone only the warning that torch's default weights_only load refuses numpy; a transformers training_args.bin
    names its globals (it is a pickled TrainingArguments) but never fails verify of its dir."""
    result, doc = cli("inspect", os.path.join(corpus["accelerate"], "random_states_0.pkl"), "--json")
    assert [p["code"] for p in doc["problems"]] == ["needs_safe_globals"] and "numpy.ndarray" in doc["pickle_globals"]
    result, doc = cli("verify", "--for-resume", corpus["accelerate"], "--json")
    assert doc["ok"] and doc["problems"] == [], doc["problems"]
    checkpoint = os.path.join(runs["transformers"], sorted(os.listdir(runs["transformers"]))[-1])
    args_file = os.path.join(checkpoint, "training_args.bin")
    result, doc = cli("inspect", args_file, "--json")
    assert [p["code"] for p in doc["problems"]] == ["unsafe_pickle"]
    assert any(g.startswith("transformers.training_args") for g in doc["pickle_globals"])
    result, doc = cli("verify", "--for-resume", checkpoint, "--json")
    assert doc["ok"], doc["problems"]


@pytest.mark.skipif(not os.environ.get("CKPTTOOL_BIG_TESTS"), reason="writes 4 GiB; set CKPTTOOL_BIG_TESTS=1")
def test_archive_writer_zip64_member_past_4_gib(tmp_path):
    from ckpttool.formats.ziparchive import ZIP64_LIMIT

    size = ZIP64_LIMIT + 4097
    writer = torchwriter.Writer(str(tmp_path / "big.pt"), [("big", "uint8", (size,)), ("after", "float32", (2,))])
    chunk = memoryview(bytes(range(256)) * (1 << 16))
    writer._zip.write_stream("data/0", size, (chunk[:min(len(chunk), size - o)] for o in range(0, size, len(chunk))))
    writer._next = 1
    writer.write("after", torch.tensor([7.0, 8.0]))
    writer.close()
    loaded = torch.load(tmp_path / "big.pt", weights_only=True, mmap=True)
    assert loaded["big"].numel() == size and int(loaded["big"][size - 1]) == (size - 1) % 256
    assert torch.equal(loaded["after"], torch.tensor([7.0, 8.0]))
    with zipfile.ZipFile(tmp_path / "big.pt") as zf:
        assert zf.getinfo("archive/data/1").header_offset > ZIP64_LIMIT
