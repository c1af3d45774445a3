"""The `ckpttool` command line: parse options, call an operation, render its report. Nothing else lives here."""

from __future__ import annotations

import json
import os
import sys

import click

from ckpttool import __version__
from ckpttool.errors import CkptError, UsageError


def _emit_json(report: dict):
    click.echo(json.dumps(report, indent=2, default=str))


def _fail(code: int, message: str):
    click.echo(f"ckpttool: {message}", err=True)
    sys.exit(code)


class Group(click.Group):
    """Turns the toolkit's errors into one-line messages and contract exit codes, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except UsageError as e:
            _fail(2, str(e))
        except CkptError as e:
            _fail(1, f"{e} [{e.code}]")
        except OSError as e:
            _fail(1, f"{e.filename or ''}: {e.strerror or e} (check the path and its permissions)")
        except KeyboardInterrupt:
            _fail(130, "interrupted")
        except Exception as e:  # a bug in ckpttool: still no traceback unless asked for
            if os.environ.get("CKPTTOOL_DEBUG"):
                raise
            _fail(1, f"internal error {type(e).__name__}: {e} (set CKPTTOOL_DEBUG=1 for the traceback and "
                     "please report it)")


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ckpttool")
def main():
    """Inspect, verify, diff, convert and repair deep-learning training checkpoints."""


@main.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.option("--tensors", "list_tensors", is_flag=True, help="List every tensor (name, shape, dtype, bytes).")
@click.option("--filter", "tensor_filter", metavar="REGEX", help="With --tensors: only names matching REGEX.")
def inspect(path, as_json, list_tensors, tensor_filter):
    """What a checkpoint is: format, layout, step, components, tensors, dtypes, quantization, problems.

    Reads headers only, never tensor data. Exit 1 when it finds error-level problems."""
    from ckpttool.operations.inspect import has_errors, inspect as run_inspect

    if tensor_filter:
        import re
        try:
            re.compile(tensor_filter)
        except re.error as e:
            raise click.BadParameter(f"not a regular expression ({e})", param_hint="--filter") from None
    report = run_inspect(path, tensor_filter, list_tensors or bool(tensor_filter))
    if as_json:
        _emit_json(report)
    else:
        from ckpttool.render import inspect_report  # tabulate only when a person reads the output

        click.echo(inspect_report(report))
    sys.exit(1 if has_errors(report) else 0)


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
        from ckpttool.render import human_bytes

        click.echo(f"wrote {result['manifest']}: {result['files']} files, {result['tensors']} tensors, "
                   f"{human_bytes(result['bytes'])}")


@main.command()
@click.argument("path", required=False, type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.option("--require-manifest", is_flag=True, help="Fail when there is no manifest to check against.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="Trainer config (resume_from_checkpoint, global_step, epoch) that must agree with the checkpoint.")
@click.option("--expect-step", type=int, help="Fail unless the checkpoint is at this step.")
@click.option("--for-resume", is_flag=True, help="Require the optimizer, scheduler and RNG state a resume needs.")
@click.option("--finite", is_flag=True, help="Scan every float tensor for NaN/Inf (reads all tensor data).")
def verify(path, as_json, require_manifest, config_file, expect_step, for_resume, finite):
    """Is this checkpoint intact and consistent? Exit 0 only when no check failed.

    PATH may be left out when --config names the checkpoint (resume_from_checkpoint)."""
    from ckpttool.operations.verify import verify as run_verify

    report = run_verify(path, require_manifest=require_manifest, config_file=config_file, expect_step=expect_step,
                        for_resume=for_resume, finite=finite)
    if as_json:
        _emit_json(report)
    else:
        from ckpttool.render import verify_report

        click.echo(verify_report(report))
    sys.exit(0 if report["ok"] else 1)


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
        for skipped in result["skipped"]:
            click.echo(f"skipped {skipped['path']}: {', '.join(skipped['codes'])}: {skipped['reason']}", err=True)
        if result["path"]:
            click.echo(result["path"])
        else:
            click.echo(f"ckpttool: no valid checkpoint under {directory}", err=True)
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

    result = run_prune(directory, keep, keep_every, dry_run)
    if as_json:
        _emit_json(result)
    else:
        from ckpttool.render import prune_report

        click.echo(prune_report(result))
