"""`python -m trainer`: the training loop, resume through ckpttool's gate, DDP under torchrun, SIGTERM handling."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys

import torch

from trainer import checkpoint, determinism
from trainer.model import Denoiser, SyntheticData, lr_lambda


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--checkpointing-steps", type=int, required=True)
    p.add_argument("--checkpoints-total-limit", type=int, default=None)
    p.add_argument("--resume-from-checkpoint", default=None, help="'latest' or a checkpoint dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--gradient-accumulation-steps", type=int, default=2)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--ema-decay", type=float, default=0.99)
    p.add_argument("--async-save", action="store_true", help="write checkpoints on a background thread")
    p.add_argument("--quantize", choices=["qint8"], help="freeze linear_1 as an optimum-quanto qint8 base layer")
    p.add_argument("--freeze", action="append", default=[], metavar="MODULE",
                   help="do not train this module's weight (what --quantize implies for linear_1)")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no",
                   help="autocast the forward pass; fp16 adds a GradScaler, saved as scaler.pt")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=positive_int, default=determinism.DEFAULT_THREADS,
                   help="intra-op CPU threads per process, fixed for the whole run so that it is bit-exact whatever "
                        "the load (default: %(default)s); a resume with another count is not bit-exact and says so")
    return p.parse_args(argv)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


class Distributed:
    """torchrun's environment (gloo on CPU, nccl on GPU), or a single process."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(device if device != "cuda" else f"cuda:{self.local_rank}")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1:
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def all_agree(self, ok: bool) -> bool:
        """True only if every rank says ok (a refusal on any rank stops all, nobody hangs)."""
        if self.world == 1:
            return ok
        flag = torch.tensor([1 if ok else 0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def any(self, value: bool) -> bool:
        return not self.all_agree(not value)

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def close(self):
        if self.world > 1:
            torch.distributed.destroy_process_group()


def log(dist, message):
    if dist.rank == 0:
        print(f"[trainer] {message}", flush=True)


def warn(dist, message):
    if dist.rank == 0:
        print(f"[trainer] warning: {message}", file=sys.stderr, flush=True)


def build_model(args, device):
    torch.manual_seed(args.seed)  # same initial weights on every rank
    model = Denoiser()
    if args.quantize:
        from optimum.quanto import freeze, qint8, quantize

        quantize(model, weights=qint8, include=["linear_1"])
        freeze(model)
    for name in set(args.freeze) | ({"linear_1"} if args.quantize else set()):
        getattr(model, name).weight.requires_grad_(False)
    return model.to(device)


def choose_checkpoint(args, dist) -> str | None:
    """Rank 0 picks the checkpoint (skipping invalid ones, each named); every rank gets its choice."""
    choice = None
    if dist.rank == 0 and args.resume_from_checkpoint:
        if args.resume_from_checkpoint == "latest":
            from ckpttool.operations.latest import latest

            found = latest(args.output_dir, for_resume=True) if os.path.isdir(args.output_dir) else \
                {"path": None, "skipped": []}
            for skipped in found["skipped"]:
                log(dist, f"skipping {skipped['path']}: {', '.join(skipped['codes'])}: {skipped['reason']}")
            choice = found["path"]
            log(dist, f"resuming from {choice}" if choice else "no valid checkpoint found; starting a new run")
        else:
            choice = args.resume_from_checkpoint
    return dist.broadcast(choice)


def gate_and_load(path, raw_model, optimizer, scheduler, ema, dist, scaler=None) -> dict:
    """Every rank gates the checkpoint (and its own RNG file); all agree before anyone loads."""
    from ckpttool.gate import ResumeGateError, check_resume

    error = None
    try:
        check_resume(path, model=raw_model, optimizer=optimizer, scheduler=scheduler)
        if not os.path.isfile(os.path.join(path, f"random_states_{dist.rank}.pkl")):
            error = f"{path} has no random_states_{dist.rank}.pkl for rank {dist.rank} (saved with fewer processes?)"
        elif scaler is not None and not os.path.isfile(os.path.join(path, "scaler.pt")):
            error = f"{path} has no scaler.pt: it was not saved by an fp16 run, so the loss scale would restart"
    except ResumeGateError as e:
        error = str(e)
    if error:
        print(f"[trainer rank {dist.rank}] {error}", file=sys.stderr, flush=True)
    if not dist.all_agree(error is None):
        raise SystemExit(f"[trainer rank {dist.rank}] resume refused" + ("" if error else " by another rank"))
    return checkpoint.load(path, raw_model, optimizer, scheduler, ema, dist.rank, scaler)


def main(argv=None) -> int:
    from ckpttool.errors import OutputError

    args = parse_args(argv)
    try:
        return train(args)
    except OutputError as e:  # a full or read-only disk: the staging dir is gone, the last checkpoint stands
        print(f"[trainer] cannot save: {e}", file=sys.stderr, flush=True)
        return 1


def seed_everything(seed: int, rank: int):
    """Every RNG this process has, seeded (torch's per rank, for noise and dropout). Python's and numpy's draw
    nothing here, but their states are saved in random_states_N.pkl: seeded, two runs write identical files."""
    import random

    random.seed(seed * 1000 + rank)
    torch.manual_seed(seed * 1000 + rank)
    try:
        import numpy as np
    except ImportError:
        return
    np.random.seed(seed * 1000 + rank)


def train(args) -> int:
    dist = Distributed(args.device)
    determinism.pin(args.threads, dist.device)
    conditions = determinism.conditions(args.threads, dist.device)
    stop = {"requested": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
    raw_model = build_model(args, dist.device)
    model = raw_model if dist.world == 1 else torch.nn.parallel.DistributedDataParallel(
        raw_model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    params = [p for p in raw_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup_steps, args.max_steps))
    ema = {n: p.detach().clone() for n, p in raw_model.named_parameters() if p.requires_grad}
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    scaler = torch.amp.GradScaler(dist.device.type) if args.mixed_precision == "fp16" else None
    seed_everything(args.seed, dist.rank)
    data = SyntheticData(args.seed)
    step = epoch = 0
    if dist.rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
    resume = choose_checkpoint(args, dist)
    if resume:
        state = gate_and_load(resume, raw_model, optimizer, scheduler, ema, dist, scaler)
        step, epoch = int(state["global_step"]), int(state.get("epoch") or 0)
        log(dist, f"resumed at step {step}")
        warning = determinism.resume_warning(resume, state.get(checkpoint.CONDITIONS), conditions)
        if warning:
            warn(dist, warning)
    saver = checkpoint.BackgroundSaver() if args.async_save else None
    qmap = None
    if args.quantize:
        from optimum.quanto import quantization_map

        qmap = quantization_map(raw_model)

    def save():
        if saver:
            saver.wait()  # one save in flight: the previous one is published before the next starts
        snap = checkpoint.snapshot(step, epoch, raw_model, optimizer, scheduler, ema, dist.rank, qmap, scaler,
                                   conditions)
        tmp = checkpoint.prepare(args.output_dir, step, dist.rank, dist.barrier)
        job = (args.output_dir, tmp, snap, dist.rank, dist.world, args.checkpoints_total_limit)
        if saver:
            saver.submit(checkpoint.write_and_publish, *job)
        else:
            checkpoint.write_and_publish(*job)
            dist.barrier()
            log(dist, f"saved {checkpoint.checkpoint_dir(args.output_dir, step)}")

    accum = args.gradient_accumulation_steps
    log(dist, f"training from step {step} to {args.max_steps} on {dist.world} process(es), "
              f"{args.threads} CPU thread(s) each (--threads)")
    while step < args.max_steps:
        model.train()
        for micro in range(accum):
            clean, epoch = data.batch((step * accum + micro) * dist.world + dist.rank, args.batch_size)
            clean = clean.to(dist.device)
            sigma = torch.rand(clean.shape[0], device=dist.device)
            noise = torch.randn_like(clean)
            sync = contextlib.nullcontext() if dist.world == 1 or micro == accum - 1 else model.no_sync()
            with sync, torch.autocast(dist.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = torch.nn.functional.mse_loss(model(clean + sigma[:, None] * noise, sigma).float(), noise) / accum
            (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, p in raw_model.named_parameters():
                if name in ema:
                    ema[name].mul_(args.ema_decay).add_(p.detach(), alpha=1 - args.ema_decay)
        step += 1
        checkpoint.fault("after-step", step)
        stopping = dist.any(stop["requested"])
        if step % args.checkpointing_steps == 0 or step == args.max_steps or stopping:
            log(dist, f"step {step} loss {loss.item() * accum:.5f}")
            save()
        if stopping:
            log(dist, f"SIGTERM: saved step {step}, exiting")
            break
    if saver:
        saver.wait()
        dist.barrier()
        log(dist, f"saved {checkpoint.checkpoint_dir(args.output_dir, step)} (in the background)")
    dist.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
