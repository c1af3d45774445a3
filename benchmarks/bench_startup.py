"""Start-up: each command on tiny files of every layout, against `python -c pass`, in alternating pairs.

A script or a CI loop calls ckpttool once per checkpoint, so on small files the interpreter start and the imports are
the whole cost. ckpttool is measured as a user has it: a regular (not editable) install, built from this tree into a
temporary folder by pip, run as its `ckpttool` console script from a folder outside the tree. Each command runs once
to warm the bytecode cache (PYTHONDONTWRITEBYTECODE is dropped for the runs, as it is unset on a user's machine), then
`--repeat` times, each run right after a `python -c pass` (so a noisy neighbour hits both alike); the table gives the
medians and the ratio of CPU times (user + system: a neighbour's load stretches wall time, hardly CPU time). Asked
(issue 31): --help within 2.5x, inspect of a tiny .pt within 4x, verify within 4.5x.

    python benchmarks/bench_startup.py [--repeat 10] [--against GIT_REF]

`--against` installs that commit of the tree too and times it in the same alternation (python, then this tree and the
other, in turns first), so a change's start-up cost is read side by side in one run.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def tiny_files(folder: str) -> dict[str, str]:
    """A tiny file (or dir) of each layout: safetensors, torch zip, a training dict, an Accelerate dir, a DCP dir."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    warnings.filterwarnings("ignore")  # dcp.save without a process group says so

    model = {"w": torch.zeros(4, 4), "b": torch.zeros(4)}
    made = {"safetensors": os.path.join(folder, "tiny.safetensors"), "pt": os.path.join(folder, "tiny.pt"),
            "training dict": os.path.join(folder, "train.pt"), "accelerate dir": os.path.join(folder, "state"),
            "dcp dir": os.path.join(folder, "dcp")}
    save_file(model, made["safetensors"])
    torch.save(model, made["pt"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(4))], lr=0.1)
    torch.save({"model": model, "optimizer": opt.state_dict(), "global_step": 3}, made["training dict"])
    os.makedirs(made["accelerate dir"])
    save_file(model, os.path.join(made["accelerate dir"], "model.safetensors"))
    torch.save(opt.state_dict(), os.path.join(made["accelerate dir"], "optimizer.bin"))
    dcp.save({"model": model}, checkpoint_id=made["dcp dir"], no_dist=True)
    return made


def installed(folder: str, ref: str | None = None) -> tuple[str, dict]:
    """(the console script, the environment to run it in) of a regular install into `folder` of this tree, or of the
    commit `ref` of it."""
    source = ROOT
    if ref is not None:
        source = os.path.join(folder, "source")
        os.makedirs(source)
        archive = subprocess.run(["git", "-C", ROOT, "archive", ref], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", source], input=archive, check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", os.path.join(folder, "site"), source], check=True, capture_output=True)
    folder = os.path.join(folder, "site")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return os.path.join(folder, "bin", "ckpttool"), dict(env, CKPTTOOL_CACHE_DIR="", PYTHONPATH=folder)


def timed(cmd: list[str], env: dict, cwd: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process: user + system). The CPU time is what a busy neighbour disturbs
    least: it is not stretched by waiting for a core."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--against", metavar="GIT_REF", help="also time this commit's install, side by side")
    args = parser.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as install, \
            tempfile.TemporaryDirectory() as other:
        files = tiny_files(folder)
        script, env = installed(install)
        against = installed(other, args.against) if args.against else None
        commands = [("--help", ["--help"])]
        commands += [(f"inspect {kind}", ["inspect", path]) for kind, path in files.items()]
        commands += [(f"verify {kind}", ["verify", path]) for kind, path in files.items()]
        commands += [("inspect, 5 files in one call", ["inspect", *files.values()])]
        print(f"a regular install ({script}); medians of {args.repeat} runs, each right after a `python -c pass`;")
        print("wall seconds, and the ratio of CPU time (user + system) to python's")
        header = f"{'command':34} {'ckpttool':>9} {'python':>8} {'cpu ratio':>9}"
        print(header + (f" {args.against:>12} {'cpu ratio':>9}" if against else ""))
        for label, argv in commands:
            ours, base, theirs = [], [], []
            timed([script, *argv], env, folder)  # writes the bytecode cache
            if against:
                timed([against[0], *argv], against[1], folder)
            for i in range(args.repeat):
                base.append(timed([py, "-c", "pass"], env, folder))
                runs = [(ours, [script, *argv], env)] + ([(theirs, [against[0], *argv], against[1])] if against else [])
                for times, cmd, cmd_env in runs if i % 2 else runs[::-1]:  # alternate which goes first
                    times.append(timed(cmd, cmd_env, folder))
            def medians(times):
                return statistics.median(w for w, _ in times), statistics.median(c for _, c in times)

            (o, o_cpu), (b, b_cpu) = medians(ours), medians(base)
            line = f"{label:34} {o:8.3f}s {b:7.3f}s {o_cpu / b_cpu:8.2f}x"
            if against:
                t, t_cpu = medians(theirs)
                line += f" {t:11.3f}s {t_cpu / b_cpu:8.2f}x"
            print(line)


if __name__ == "__main__":
    main()
