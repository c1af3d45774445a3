"""verify and manifest under torchrun: the work is shared among the processes and the result is the single-process
result, bit for bit; rank 0 alone prints."""

import os
import shutil
import subprocess
import sys

import pytest

from ckpttool.synthetic.catalog import SAMPLES as SHIPPED

DATA = os.path.join(os.path.dirname(__file__), "data")


def run(*args, ranks=None):
    """`ckpttool ARGS` in one process, or under torchrun with `ranks` processes on a free port (--standalone, so a
    suite running beside this one cannot collide): (exit code, stdout, stderr)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", SOURCE_DATE_EPOCH="1700000000")
    launcher = [] if ranks is None else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                         str(ranks)]
    proc = subprocess.run([sys.executable, *launcher, "-m", "ckpttool", *args], capture_output=True, text=True,
                          env=env, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A DeepSpeed save (several rank files, chunked tensors) and a transformers-style dir of several files."""
    root = tmp_path_factory.mktemp("dist")
    shutil.copytree(os.path.join(DATA, "deepspeed", "zero3"), root / "zero3")
    shutil.copytree(os.path.join(DATA, "fp16", "transformers", "checkpoint-10"), root / "checkpoint-10")
    return root


@pytest.mark.parametrize("name", ["zero3/global_step5", "checkpoint-10"])
def test_manifest_bytes_and_verify_report_equal_one_process(run_dir, name):
    path = str(run_dir / name)
    manifest = os.path.join(path, "ckpttool-manifest.json")
    code, out, _ = run("manifest", path)
    assert code == 0
    with open(manifest, "rb") as f:
        single = f.read()
    os.remove(manifest)
    code, out2, err2 = run("manifest", path, ranks=2)
    assert code == 0 and out2 == out, err2[-2000:]
    with open(manifest, "rb") as f:
        assert f.read() == single
    for args in (["verify", "--json", "--finite", "--for-resume"], ["verify"]):
        one = run(*args, path)
        two = run(*args, path, ranks=2)
        assert one[0] == two[0] == 0 and one[1] == two[1]
        assert one[1].count("checksums") == 1  # printed once, by rank 0


def test_a_damaged_file_fails_the_same_way(tmp_path):
    path = tmp_path / "copy"
    shutil.copytree(os.path.join(DATA, "deepspeed", "zero3", "global_step5"), path)
    assert run("manifest", str(path))[0] == 0
    target = path / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    one = run("verify", "--json", str(path))
    two = run("verify", "--json", str(path), ranks=2)
    assert one[0] == two[0] == 1 and one[1] == two[1] and '"checksum_mismatch"' in one[1]


def test_other_commands_run_once_on_rank_zero(run_dir):
    one = run("inspect", str(run_dir / "checkpoint-10"))
    two = run("inspect", str(run_dir / "checkpoint-10"), ranks=2)
    assert one[0] == two[0] == 0 and one[1] == two[1]


def test_the_share_splits_bytes_evenly_and_covers_every_job(monkeypatch):
    """Each process gets the largest remaining job while it has the fewest bytes: every job once, loads balanced."""
    import torch.distributed as dist

    from ckpttool import distributed

    sizes = [64 << 20] * 37 + [5 << 20, 1, 0, 3 << 20]
    for world in (1, 2, 3, 4):
        monkeypatch.setattr(dist, "get_world_size", lambda: world)
        shares = []
        for rank in range(world):
            monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
            shares.append(distributed.share(sizes))
        assert sorted(i for s in shares for i in s) == list(range(len(sizes)))
        loads = [sum(sizes[i] for i in s) for s in shares]
        assert max(loads) - min(loads) <= max(sizes)


def test_outside_torchrun_nothing_distributed_is_imported():
    code = ("import sys; from ckpttool.cli import main; sys.argv = ['ckpttool', 'verify', sys.argv[1]]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "assert 'torch.distributed' not in sys.modules, 'imported'")
    proc = subprocess.run([sys.executable, "-c", code, os.path.join(SHIPPED, "deepspeed", "zero2")],
                          capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")})
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_tensor_that_cannot_be_read_stops_every_process_the_same_way(corpus, tmp_path):
    """verify --finite reads tensors on every process: a damaged one is the same one-line error from rank 0, and the
    other ranks stop too instead of waiting for it."""
    path = tmp_path / "dcp"
    shutil.copytree(corpus["dcp"], path)
    from ckpttool.checkpoint import open_checkpoint

    loc = open_checkpoint(str(path)).model.tensors[0].location
    with open(loc.file, "r+b") as f:
        f.seek(loc.offset)
        f.write(b"XXXX")  # the tensor's archive no longer starts with a zip header
    one = run("verify", "--finite", str(path))
    two = run("verify", "--finite", str(path), ranks=2)
    assert one[0] == two[0] == 1 and one[1] == two[1] and one[2].strip() in two[2]
    assert one[2].startswith("ckpttool: ") and "[corrupt]" in one[2] and "internal error" not in one[2]


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_that_never_joins_ends_the_launch_with_one_line(run_dir):
    env = dict(os.environ, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), CKPTTOOL_DIST_JOIN_S="3", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "ckpttool", "verify", str(run_dir / "checkpoint-10")],
                          capture_output=True, text=True, env=env, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "not all 2 processes joined within 3 s" in lines[0], \
        proc.stderr


def test_ranks_that_see_different_bytes_fail_alike(run_dir, tmp_path):
    """Each rank verifies `ckpt` relative to its own folder (another node's copy): one is cut short."""
    for rank in (0, 1):
        shutil.copytree(run_dir / "checkpoint-10", tmp_path / f"node{rank}" / "ckpt")
    with open(tmp_path / "node1" / "ckpt" / "optimizer.pt", "r+b") as f:
        f.truncate(1000)
    script = tmp_path / "rank.sh"
    script.write_text(f'cd {tmp_path}/node$RANK && exec {sys.executable} -m ckpttool verify ckpt\n')
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "--no-python", "bash", str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and "OK: verified" not in proc.stdout
    assert "the processes do not see the same checkpoint" in proc.stdout + proc.stderr


@pytest.mark.parametrize("value", ["abc", "inf", "0", "-5"])
def test_a_join_timeout_that_is_no_duration_is_one_line(run_dir, value):
    env = dict(os.environ, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), CKPTTOOL_DIST_JOIN_S=value)
    proc = subprocess.run([sys.executable, "-m", "ckpttool", "verify", str(run_dir / "checkpoint-10")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == \
        f"ckpttool: CKPTTOOL_DIST_JOIN_S={value!r}: give a positive number of seconds"


def test_manifest_of_copies_with_other_bytes_fails_alike(run_dir, tmp_path):
    import torch

    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
        torch.save({"w": torch.full((8,), float(rank))}, tmp_path / f"node{rank}" / "x.pt")  # same layout
    script = tmp_path / "rank.sh"
    script.write_text(f'cd {tmp_path}/node$RANK && exec {sys.executable} -m ckpttool manifest x.pt\n')
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "--no-python", "bash", str(script)], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode != 0 and "internal error" not in proc.stderr
    assert "the processes do not see the same checkpoint" in proc.stderr
    assert not [p for p in tmp_path.rglob("*.ckpttool-manifest.json")]
