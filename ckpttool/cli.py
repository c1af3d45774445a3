"""The `ckpttool` command line: parse options, call an operation, render its report. Nothing else lives here."""

from __future__ import annotations

import gc
import os
import sys

import click

from ckpttool import __version__
from ckpttool.errors import CkptError, OutputError, UsageError


def _emit_json(report):
    import json

    from ckpttool.model import to_json

    click.echo(json.dumps(to_json(report), indent=2, default=str))


# What a terminal would act on rather than show: C0 and C1 controls (ESC starts colour, cursor and title sequences;
# a newline starts a fake line of output) and the bidirectional overrides that reorder what is shown.
UNPRINTABLE = dict.fromkeys([*range(0x20), 0x7F, *range(0x80, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A)])


def _safe(value):
    """A report with every string in it shown as text: names, paths and messages come from the checkpoint's bytes,
    so their control characters are written as escapes (\\x1b, \\n), never sent to the terminal. JSON output escapes
    them itself."""
    if isinstance(value, str):
        if not any(ord(c) in UNPRINTABLE for c in value):
            return value
        return "".join(repr(c)[1:-1] if ord(c) in UNPRINTABLE else c for c in value)
    if isinstance(value, dict):
        return {_safe(k): _safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_safe(v) for v in value]
    return value


def _show(report, as_json: bool, table: str):
    """JSON for scripts, or the named table from ckpttool.render (imported only then: tabulate costs start-up): a
    typed report becomes JSON here, at the edge, for both."""
    if as_json:
        _emit_json(report)
    else:
        from ckpttool import render
        from ckpttool.model import to_json

        click.echo(getattr(render, table)(_safe(to_json(report))))


def _fail(code: int, message: str):
    click.echo(f"ckpttool: {_safe(message)}", err=True)
    sys.exit(code)


def _launch():
    """ckpttool.distributed while this command shares its work over a torchrun launch, else None (the module is
    imported only under torchrun)."""
    module = sys.modules.get("ckpttool.distributed")
    return module if module is not None and module.active() else None


class Terminated(BaseException):
    """SIGTERM (timeout, Slurm, Docker) raised where the command is, so that every `finally` removes its staging."""


def _terminated(signum, frame):
    raise Terminated


def _on_sigterm(handler):
    """Install `handler` for SIGTERM and return the one it replaces (nothing outside the main thread, where Python
    allows no handler: a command run in-process from another thread keeps the caller's)."""
    import signal
    import threading

    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


class Group(click.Group):
    """Turns the toolkit's errors into one-line messages and contract exit codes, never a traceback."""

    def resolve_command(self, ctx, args):
        name, command, rest = super().resolve_command(ctx, args)
        from ckpttool import distributed

        if distributed.launched():
            distributed.enter(name)
        return name, command, rest

    def invoke(self, ctx):
        # A command builds up to millions of small acyclic records (a 100,000-tensor file); the cycle collector's
        # passes over them cost as much as building them. Paused for the command (restored for callers in-process).
        collecting = gc.isenabled()
        gc.disable()
        previous = _on_sigterm(_terminated)
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except UsageError as e:
            _fail(2, str(e))
        except CkptError as e:
            _fail(1, f"{e} [{e.code}]")
        except OutputError as e:
            _fail(1, str(e))
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            _fail(1, f"{where}{e.strerror or e} (check the path, its permissions and the free space)")
        except RuntimeError as e:
            if _launch():
                # a collective whose peer has gone: that process failed first (its output is silenced, rank 0's not)
                _fail(1, f"another process of the launch stopped ({type(e).__name__}: {str(e)[:120]}): it failed "
                         "on its own, or sees another checkpoint; verify from one process to see why")
            if os.environ.get("CKPTTOOL_DEBUG"):
                raise
            _fail(1, f"internal error {type(e).__name__}: {e} (set CKPTTOOL_DEBUG=1 for the traceback and "
                     "please report it)")
        except KeyboardInterrupt:
            _fail(130, "interrupted")
        except Terminated:
            _fail(143, "terminated (SIGTERM); nothing was left half-written (an output being written was removed, a "
                       "checkpoint prune was deleting is whole or gone), inputs untouched")
        except Exception as e:  # a bug in ckpttool: still no traceback unless asked for
            if os.environ.get("CKPTTOOL_DEBUG"):
                raise
            _fail(1, f"internal error {type(e).__name__}: {e} (set CKPTTOOL_DEBUG=1 for the traceback and "
                     "please report it)")
        finally:
            _on_sigterm(previous)
            if collecting:
                gc.enable()
            if "ckpttool.distributed" in sys.modules:  # loaded only under torchrun
                sys.modules["ckpttool.distributed"].stop()


class CheckpointPath(click.Path):
    """An existing path, or a link to nothing: inspect and verify say why (a download cut short, a lost target)."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and os.path.islink(value) and not os.path.exists(value):
            return value
        return super().convert(value, param, ctx)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ckpttool")
def main():
    """Inspect, verify, diff, convert and repair deep-learning training checkpoints."""


@main.command()
@click.argument("paths", nargs=-1, required=True, type=CheckpointPath(exists=True))
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout (a list of them for several "
              "paths).")
@click.option("--tensors", "list_tensors", is_flag=True, help="List every tensor (name, shape, dtype, bytes).")
@click.option("--filter", "tensor_filter", metavar="REGEX",
              help="With --tensors or --stats: only names matching REGEX (alone, it implies --tensors).")
@click.option("--stats", is_flag=True, help="Per tensor min, max, mean, std, L2 norm and NaN/Inf/zero counts "
              "(reads every tensor's data; quanto weights dequantized first).")
@click.option("--modules", "modules", is_flag=True, help="The module tree from the keys: parameters, bytes and "
              "dtypes per module; quantized, tied and missing-in-EMA modules marked.")
@click.option("--depth", type=click.IntRange(min=1), help="With --modules: down to this depth (default: all).")
def inspect(paths, as_json, list_tensors, tensor_filter, stats, modules, depth):
    """What a checkpoint is: format, layout, step, components, tensors, dtypes, quantization, problems.

    Reads headers only, never tensor data (except with --stats). Several PATHS: one table (or one JSON list), start-up
    paid once. Exit 1 when it finds error-level problems in any."""
    from ckpttool.operations.inspect import has_errors, inspect as run_inspect

    if tensor_filter:
        import re
        try:
            re.compile(tensor_filter)
        except re.error as e:
            raise click.BadParameter(f"not a regular expression ({e})", param_hint="--filter") from None
    if depth is not None and not modules:
        raise click.BadParameter("--depth goes with --modules", param_hint="--depth")
    reports = [run_inspect(path, tensor_filter, list_tensors or (bool(tensor_filter) and not stats), stats, modules,
                           depth) for path in paths]
    detailed = list_tensors or tensor_filter or stats or modules
    _show(reports[0] if len(reports) == 1 else reports, as_json,
          "inspect_report" if len(reports) == 1 else "inspect_reports" if detailed else "inspect_table")
    sys.exit(1 if any(has_errors(r) for r in reports) else 0)


@main.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--force", is_flag=True, help="Replace an existing manifest.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def manifest(path, force, as_json):
    """Write xxh3-128 checksums of a checkpoint (per file and per tensor) so verify can catch bit rot.

    A directory's manifest goes inside it (ckpttool-manifest.json), a file's beside it."""
    from ckpttool.operations.manifest import write

    result = write(path, force=force)
    if as_json:
        _emit_json(result)
    else:
        result = _safe(result)
        from ckpttool.render import human_bytes

        click.echo(f"wrote {result['manifest']}: {result['files']} files, {result['tensors']} tensors, "
                   f"{human_bytes(result['bytes'])}")


@main.command()
@click.argument("paths", nargs=-1, type=CheckpointPath(exists=True))
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout (a list of them for several "
              "paths).")
@click.option("--require-manifest", is_flag=True, help="Fail when there is no manifest to check against.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="Trainer config (resume_from_checkpoint, global_step, epoch) that must agree with the checkpoint.")
@click.option("--expect-step", type=int, help="Fail unless the checkpoint is at this step.")
@click.option("--for-resume", is_flag=True, help="Require the optimizer, scheduler and RNG state a resume needs.")
@click.option("--finite", is_flag=True, help="Scan every float tensor for NaN/Inf (reads all tensor data).")
def verify(paths, as_json, require_manifest, config_file, expect_step, for_resume, finite):
    """Is this checkpoint intact and consistent? Exit 0 only when no check failed.

    PATHS may be left out when --config names the checkpoint (resume_from_checkpoint). Several PATHS: one table (or
    one JSON list), start-up paid once; exit 0 only when every one passes."""
    from ckpttool.operations.verify_cache import recall

    if len(paths) > 1 and config_file:
        raise click.UsageError("--config names one checkpoint: give at most one PATH with it")
    options = {"require_manifest": require_manifest, "expect_step": expect_step, "for_resume": for_resume,
               "finite": finite}
    reports = []
    for path in paths or (None,):
        report = recall(path, config_file, **options)  # before the readers are even imported
        if report is None:
            from ckpttool.operations.verify import verify as run_verify

            report = run_verify(path, config_file=config_file, recall=False, **options)
        reports.append(report)
    if launch := _launch():
        launch.same_everywhere("the verdict", [
            (r.ok, r.step, sorted((p.code.value, p.severity.value, p.path) for p in r.problems)) for r in reports])
    _show(reports[0] if len(reports) == 1 else reports, as_json,
          "verify_report" if len(reports) == 1 else "verify_table")
    sys.exit(0 if all(r.ok for r in reports) else 1)


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.option("--for-resume", is_flag=True, help="Only accept checkpoints with full training state.")
def latest(directory, as_json, for_resume):
    """The newest checkpoint under DIRECTORY that verifies (printed as its path), with what was skipped."""
    from ckpttool.operations.latest import latest as run_latest

    result = run_latest(directory, for_resume=for_resume)
    if as_json:
        _emit_json(result)
    else:
        result = _safe(result)
        for skipped in result["skipped"]:
            click.echo(f"skipped {skipped['path']}: {', '.join(skipped['codes'])}: {skipped['reason']}", err=True)
        if result.get("differs"):
            click.echo(f"note: {result['differs']}", err=True)
        if result["path"]:
            click.echo(result["path"])
        else:
            click.echo(f"ckpttool: no valid checkpoint under {_safe(directory)}", err=True)
    sys.exit(0 if result["path"] else 1)


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--keep", type=int, required=True, help="How many of the newest valid checkpoints to keep (>= 1).")
@click.option("--keep-every", type=int, help="Also keep every checkpoint whose step is a multiple of K.")
@click.option("--dry-run", is_flag=True, help="List what would be deleted; delete nothing.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def prune(directory, keep, keep_every, dry_run, as_json):
    """Delete old checkpoints beyond the newest N valid ones; never the newest valid one, never a non-checkpoint."""
    from ckpttool.operations.prune import prune as run_prune

    result = run_prune(directory, keep, keep_every, dry_run=dry_run)
    _show(result, as_json, "prune_report")


@main.command()
@click.argument("a", type=click.Path(exists=True))
@click.argument("b", required=False, type=click.Path(exists=True))
@click.option("--model", "model_spec", metavar="MODULE:CALLABLE",
              help="Compare A against this model's state_dict() instead of a checkpoint B (imports your code).")
@click.option("--component", help="Which part to compare: model, ema, optimizer, model_1, unet, ... (default: the "
              "model; two diffusers pipelines component by component)")
@click.option("--no-normalize", is_flag=True, help="Compare raw keys (no prefix or wrapper rules).")
@click.option("--values", is_flag=True, help="Also compare contents (max abs diff, rel-L2, cosine; per module).")
@click.option("--atol", type=float, default=0.0, show_default=True, help="With --values: absolute tolerance.")
@click.option("--rtol", type=float, default=0.0, show_default=True, help="With --values: relative tolerance.")
@click.option("--by-module", is_flag=True, help="With --values: also the relative change of each module.")
@click.option("--module-depth", type=click.IntRange(min=1), default=2, show_default=True,
              help="With --by-module or --plot: group keys into modules by this many name parts.")
@click.option("--plot", "plot_path", metavar="FILE.png|FILE.html", type=click.Path(dir_okay=False),
              help="With --values: draw the per-module relative change (needs the plot extra: ckpttool[plot]).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def diff(a, b, model_spec, component, no_normalize, values, atol, rtol, by_module, module_depth, plot_path, as_json):
    """Key, shape and dtype differences between checkpoints A and B (or A and --model). Exit 0 same, 1 different."""
    from ckpttool.operations.diff import diff as run_diff, plot

    if bool(b) == bool(model_spec):
        raise click.UsageError("give either a second checkpoint B or --model MODULE:CALLABLE")
    if plot_path:
        from ckpttool import charts

        if not values or model_spec:
            raise click.UsageError("--plot draws what --values measures: give --values and a checkpoint B")
        charts.check(plot_path)
    report = run_diff(a, b, model_spec=model_spec, component=component, normalize=not no_normalize, values=values,
                      atol=atol, rtol=rtol, module_depth=module_depth if by_module or plot_path else None)
    if plot_path and report.values is not None:
        plot(report, plot_path)
    _show(report, as_json, "diff_report")
    sys.exit(0 if report.same else 1)


class OrderedOpsCommand(click.Command):
    """Records --strip-prefix/--add-prefix/--rename/--drop in the order given, since they compose."""

    OPS = {"--strip-prefix": "strip_prefix", "--add-prefix": "add_prefix", "--rename": "rename", "--drop": "drop"}

    def parse_args(self, ctx, args):
        ops, i = [], 0
        while i < len(args):
            flag, sep, value = args[i].partition("=")
            if flag in self.OPS:
                if not sep:
                    i += 1
                    value = args[i] if i < len(args) else None
                if value is not None:
                    ops.append((self.OPS[flag], value))
            i += 1
        ctx.meta["ckpttool.ops"] = ops
        return super().parse_args(ctx, args)


@main.command(cls=OrderedOpsCommand)
@click.argument("src", type=click.Path(exists=True))
@click.argument("dst", type=click.Path())
@click.option("--strip-prefix", multiple=True, metavar="P", help="Remove prefix P from keys that have it.")
@click.option("--add-prefix", multiple=True, metavar="P", help="Put P in front of every key.")
@click.option("--rename", multiple=True, metavar="REGEX=REPL", help="re.sub(REGEX, REPL, key) on every key.")
@click.option("--drop", multiple=True, metavar="REGEX", help="Drop keys matching REGEX.")
@click.option("--like", type=click.Path(exists=True), help="Align keys to this reference checkpoint's keys.")
@click.option("--model", "model_spec", metavar="MODULE:CALLABLE", help="Align keys to this model's state_dict().")
@click.option("--dequantize", is_flag=True, help="optimum-quanto weights to plain weights in their original dtype.")
@click.option("--quantize", "quantize_map", type=click.Path(exists=True, dir_okay=False), metavar="QMAP.json",
              help="Plain weights to the optimum-quanto layout this quantization map describes.")
@click.option("--component", default="model", show_default=True, help="Which part of SRC to remap.")
@click.option("--to", type=click.Choice(["safetensors", "torch", "pt", "diffusers", "kohya", "original", "comfy"]),
              help="Output format (default: DST suffix), or a LoRA's key convention to move it to (diffusers, kohya, "
              "original, comfy; the format then from DST's suffix).")
@click.option("--family", type=click.Choice(["sd1", "sd2", "sdxl", "flux.1"]),
              help="With --to CONVENTION: the model the LoRA is for, where its keys cannot tell.")
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def remap(src, dst, strip_prefix, add_prefix, rename, drop, like, model_spec, dequantize, quantize_map, component,
          to, family, force, as_json):
    """Repair keys and write a new checkpoint (SRC is never modified).

    Key options apply in the order given, then --dequantize / --quantize, then --like / --model alignment."""
    from ckpttool.operations.remap import remap as run_remap

    if like and model_spec:
        raise click.UsageError("use either --like or --model, not both")
    ops = click.get_current_context().meta["ckpttool.ops"]
    result = run_remap(src, dst, ops=ops, like=like, model_spec=model_spec, dequantize=dequantize,
                       quantize_map=quantize_map, component=component, to=to, family=family, force=force)
    if as_json:
        _emit_json(result)
    else:
        result = _safe(result)
        from ckpttool.render import human_bytes

        for change in result["changes"]:
            click.echo(f"  {change}")
        click.echo(f"wrote {_safe(dst)} ({result['format']}, {result['tensors']} tensors, "
                   f"{human_bytes(result['bytes'])})")


@main.command()
@click.argument("src", type=click.Path(exists=True))
@click.argument("dst", type=click.Path())
@click.option("--to", type=click.Choice(["safetensors", "sharded", "torch", "pt", "accelerate", "dcp", "original",
                                       "diffusers"]),
              help="Target layout (default: from DST's suffix); original / diffusers: a Flux.1 transformer or SD/SDXL "
              "UNet between a diffusers folder and the original single file.")
@click.option("--family", type=click.Choice(["flux.1", "sd1", "sd2", "sdxl"]),
              help="With --to original|diffusers: the model it is, where its keys cannot tell.")
@click.option("--component", help="Convert only this part (model, ema, optimizer, model_1, unet, ...).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), help="Cast floating-point weights.")
@click.option("--allow-lossy-cast", is_flag=True, help="With --dtype: write values the cast turns into inf (beyond the "
              "target's range) or 0 (below its smallest) instead of refusing; they are counted in the output.")
@click.option("--shard-size", metavar="SIZE", help="Sharded safetensors with shards of at most SIZE (e.g. 5GB).")
@click.option("--no-verify", is_flag=True, help="Skip re-reading the output and comparing it with the source.")
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def convert(src, dst, to, family, component, dtype, allow_lossy_cast, shard_size, no_verify, force, as_json):
    """Convert between .pt, safetensors (single or sharded), Accelerate state dirs and DCP dirs, and a Flux.1
    transformer or SD/SDXL UNet between diffusers' folder and the original single file.

    Streams tensor by tensor; the output appears only when complete and verified against the source."""
    from ckpttool.operations.convert import convert as run_convert

    result = run_convert(src, dst, to=to, component=component, dtype=dtype, shard_size=shard_size,
                         verify=not no_verify, force=force, allow_lossy_cast=allow_lossy_cast, family=family)
    if as_json:
        _emit_json(result)
    else:
        result = _safe(result)
        from ckpttool.render import human_bytes

        check = f", {result['verified_tensors']} tensors verified" if result["verified_tensors"] is not None else ""
        for change in result.get("changes", ()):
            click.echo(f"  {change}")
        click.echo(f"wrote {_safe(dst)} ({result['target']}: {', '.join(result['components'])}; "
                   f"{result['tensors']} tensors, {human_bytes(result['bytes'])}{check})")
        if result["weights_only_loadable"]:
            click.echo("objects torch.load(weights_only=True) refuses, written as plain data: " +
                       "; ".join(result["weights_only_loadable"][:10]) +
                       (f" and {len(result['weights_only_loadable']) - 10} more" if
                        len(result["weights_only_loadable"]) > 10 else ""))
        if result["weights_only_refuses"]:
            click.echo("kept as they were, which torch.load(weights_only=True) refuses unless allow-listed "
                       f"(torch.serialization.add_safe_globals): {', '.join(result['weights_only_refuses'])}")
        if result["lossy_cast"]:
            lossy = result["lossy_cast"]
            click.echo(f"lossy cast to {result['dtype']} (--allow-lossy-cast): {lossy['overflowed']} values became "
                       f"inf and {lossy['underflowed']} became 0, in {len(lossy['tensors'])} tensors", err=True)


@main.command()
@click.argument("src", type=click.Path(exists=True))
@click.argument("dst", type=click.Path())
@click.option("--like", metavar="REF", type=click.Path(exists=True),
              help="Align the model weights' keys to this checkpoint's (prefixes, quanto keys), as remap --like does.")
@click.option("--dry-run", is_flag=True, help="Say what would be saved and what is lost; write nothing.")
@click.option("--link", is_flag=True, help="Hard-link the files repair leaves as they are, rather than copy them.")
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def repair(src, dst, like, dry_run, link, force, as_json):
    """Save what can be saved from a damaged checkpoint SRC into DST.

    The intact tensors of a cut or corrupt file (bit for bit), a fresh index for shards that lost theirs, DeepSpeed's
    `latest` pointed at a tag that verifies, a run without its half-written checkpoints, with --like REF the model's
    keys aligned to REF's (module./_orig_mod. prefixes, quanto keys). SRC is never modified; DST
    is written only when something was saved. Exit 0: DST written (or nothing to repair), 1: nothing could be saved."""
    from ckpttool.operations.repair import repair as run_repair

    result = run_repair(src, dst, like=like, dry_run=dry_run, force=force, link=link)
    _show(result, as_json, "repair_report")
    if not result.healthy and not result.saves_something:
        sys.exit(1)


def _weights(ctx, param, value):
    if value is None:
        return None
    try:
        return [float(w) for w in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected numbers separated by commas, e.g. 1,1,2") from None


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--weights", callback=_weights, metavar="W1,W2,...", help="One weight per checkpoint (normalized).")
@click.option("--ema", type=float, metavar="DECAY", help="An EMA over the checkpoints in step order (e.g. 0.999).")
@click.option("--component", default="model", show_default=True, help="Which part to average (model, ema, ...).")
@click.option("--no-normalize", is_flag=True, help="Match raw keys (no module./_orig_mod. alignment).")
@click.option("--to", type=click.Choice(["safetensors", "torch", "pt"]), help="Output format (default: DST suffix).")
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def average(paths, weights, ema, component, no_normalize, to, force, as_json):
    """Average checkpoints of one model: SRC SRC... DST (uniform, --weights or --ema).

    Streams tensor by tensor (float64 accumulation, rounded to each tensor's dtype); integer tensors are taken from the
    newest input. Refuses checkpoints whose keys or shapes differ, as diff explains them."""
    from ckpttool.operations.average import average as run_average

    if len(paths) < 3:
        raise click.UsageError("give at least two checkpoints and the output path: SRC SRC... DST")
    *sources, dst = paths
    for src in sources:
        if not os.path.exists(src):
            raise click.BadParameter(f"{src}: no such file or directory", param_hint="SRC")
    result = run_average(sources, dst, weights=weights, ema=ema, component=component, normalize=not no_normalize,
                         to=to, force=force)
    if as_json:
        _emit_json(result)
        return
    result = _safe(result)
    for rule in result["normalization"]:
        click.echo(f"aligned keys: {rule}")
    for s in result["sources"]:
        click.echo(f"  {s['weight']:.6g}  {s['path']}" + (f" (step {s['step']})" if s["step"] is not None else ""))
    if result["taken_from_newest"]:
        click.echo(f"taken from the newest input ({result['newest']}), not averaged: "
                   f"{', '.join(result['taken_from_newest'][:5])}"
                   + (f" and {len(result['taken_from_newest']) - 5} more" if len(result["taken_from_newest"]) > 5
                      else ""))
    click.echo(f"wrote {_safe(dst)} ({result['mode']} average of {len(result['sources'])} checkpoints, "
               f"{result['averaged']} tensors averaged)")


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--trainer", "trainers", multiple=True, metavar="NAME",
              help="Only this trainer (repeatable): accelerate, transformers, transformers-peft, lightning, "
              "diffusers-lora, dcp, reference, kohya, simpletuner, musubi-tuner, megatron, nemo, torchtune, composer, "
              "deepspeed, ai-toolkit, onetrainer. Default: every one whose library is installed.")
@click.option("--damage", "damages", multiple=True, metavar="KIND",
              help="Add damaged copies (repeatable): missing-<part>, truncated-<part>, empty-<part>, stale-<part>, "
              "bit-flip, or a kind alone (truncated) for every part.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def fixtures(out, trainers, damages, as_json):
    """Write small healthy checkpoints of each trainer into OUT (a new folder), made by its real library (or copied
    from a run its own code wrote, as the listing says), and with --damage damaged copies, each listed with the
    problem code `verify --for-resume` gives it: for your CI."""
    from ckpttool.operations.fixtures import fixtures as run_fixtures

    result = run_fixtures(out, list(trainers) or None, list(damages) or None)
    if as_json:
        _emit_json(result)
        return
    from tabulate import tabulate

    rows = [(e["trainer"], e["damage"] or "healthy", e["expected_code"] or "-", _safe(e["path"]))
            for e in result["entries"]]
    click.echo(tabulate(rows, headers=("trainer", "damage", "verify gives", "path")))
    for trainer, made_by in dict((e["trainer"], e["made_by"]) for e in result["entries"]).items():
        click.echo(f"{trainer}: {made_by}")
    for skip in result["skipped"]:
        click.echo(f"skipped {skip.get('trainer') or skip.get('damage')}: {skip['reason']}")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--html", "html_path", metavar="FILE.html", type=click.Path(dir_okay=False),
              help="Write one self-contained page with a chart (needs the plot extra: ckpttool[plot]).")
@click.option("--for-resume", is_flag=True, help="Judge checkpoints as `latest --for-resume` does.")
@click.option("--module-depth", type=click.IntRange(min=1), default=2, show_default=True,
              help="Group the per-module change by this many name parts.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def report(run_dir, html_path, for_resume, module_depth, as_json):
    """A whole run: every checkpoint's step, trainer, verdict and size, which one latest picks and why the others
    were skipped, and the per-module change between consecutive checkpoints."""
    from ckpttool.operations.report import report as run_report, write_html

    if html_path:
        from ckpttool import charts

        charts.check(html_path, (".html", ".htm"))
    result = run_report(run_dir, for_resume=for_resume, module_depth=module_depth)
    if html_path:
        write_html(result, html_path)
    if as_json:
        _emit_json(result)
        return
    from ckpttool import render

    click.echo(render.run_report(_safe(result)))
    if html_path:
        click.echo(f"wrote {_safe(html_path)}")
