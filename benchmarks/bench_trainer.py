"""The reference trainer's checkpoint costs, measured in one process: a save (sync, and the part of an async save
that blocks training) against one training step, and the resume gate against the load it protects.

Claims: an async save blocks training for about the time of a CPU snapshot, a small fraction of a synchronous save;
the gate (verify with manifest + key/optimizer checks) costs less than loading the checkpoint it guards.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ckpttool.gate import check_resume  # noqa: E402
from trainer import checkpoint  # noqa: E402
from trainer.model import DIM, Denoiser, lr_lambda  # noqa: E402


def median_time(fn, repeat):
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=2048, help="model width (2048: about 8.5 M parameters)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Denoiser(hidden=args.hidden)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(5, 100))
    ema = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = torch.randn(64, DIM)

    def step():
        loss = model(batch, torch.rand(64)).square().mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

    step()
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as out:
        first = next(iter(model.parameters()))

        def current_step():  # the saved step must agree with the optimizer's, or the gate refuses
            return int(optimizer.state[first]["step"])

        def sync_save():
            snap = checkpoint.snapshot(current_step(), 0, model, optimizer, scheduler, ema, 0)
            tmp = checkpoint.prepare(out, snap.step, 0, lambda: None)
            checkpoint.write_and_publish(out, tmp, snap, 0, 1)

        saver = checkpoint.BackgroundSaver()

        def async_blocking():
            snap = checkpoint.snapshot(current_step(), 0, model, optimizer, scheduler, ema, 0)
            tmp = checkpoint.prepare(out, snap.step, 0, lambda: None)
            saver.submit(checkpoint.write_and_publish, out, tmp, snap, 0, 1)

        t_step = median_time(step, args.repeat)
        t_sync = median_time(sync_save, args.repeat)
        saver.wait()
        t_async = []
        for _ in range(args.repeat):
            saver.wait()  # measure only what blocks a step: the snapshot and the hand-off
            start = time.perf_counter()
            async_blocking()
            t_async.append(time.perf_counter() - start)
        saver.wait()
        t_async = statistics.median(t_async)
        latest = max((e for e in os.listdir(out) if not e.endswith(".tmp")), key=lambda e: int(e.split("-")[1]))
        path = os.path.join(out, latest)
        fresh = Denoiser(hidden=args.hidden)
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
        fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lr_lambda(5, 100))
        t_gate = median_time(lambda: check_resume(path, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched),
                             args.repeat)
        fresh_ema = {n: p.detach().clone() for n, p in fresh.named_parameters()}
        t_load = median_time(lambda: checkpoint.load(path, fresh, fresh_opt, fresh_sched, fresh_ema, 0), args.repeat)
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    print(f"model: {params / 1e6:.1f} M parameters, checkpoint {size / 2**20:.0f} MiB; median of {args.repeat}")
    print(f"{'what':44s} {'seconds':>8s} {'x step':>7s}")
    for name, seconds in (("one training step", t_step), ("synchronous save (write, fsync, manifest)", t_sync),
                          ("async save: time the step loop is blocked", t_async), ("resume gate (check_resume)", t_gate),
                          ("checkpoint load", t_load)):
        print(f"{name:44s} {seconds:8.3f} {seconds / t_step:7.1f}")
    print(f"async blocking / sync save = {t_async / t_sync:.2f}; gate / load = {t_gate / t_load:.2f}")


if __name__ == "__main__":
    main()
