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
