"""The ``ufad`` command line: one group, one file per command, loaded when called.

    ufad export MODEL --data mnist -o OUT.onnx   # MODEL = package.module:factory
    ufad score OUT.onnx INPUTS.npy --json
    ufad inspect OUT.onnx --json
    ufad keygen KEY ; ufad sign OUT.onnx --key KEY ; ufad verify OUT.onnx --key KEY.pub
    ufad demo                                    # reference model end to end
    ufad eval / ufad bench / ufad triton         # see each command's --help
    ufad score OUT.onnx data/ --ray -o audit.parquet ; ufad serve OUT.onnx --replicas 2   # on Ray

Every user mistake prints one line ``error: ...`` naming this CLI's flags and exits 2
(never a traceback). Listing the commands (``ufad --help``) imports none of them, so it is
instant and works without torch; ``score``, ``inspect``, ``sign`` and ``verify`` need only
numpy + onnxruntime; ``export``, ``demo``, ``eval`` and ``bench`` need the ``export`` extra.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from ..errors import NO_VALUE, DependencyError, UfadError, python_style

# name -> (module, attribute, one-line help shown by `ufad --help` without importing it)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "score": ("ufad.runtime.cli.score", "score_command",
              "Score INPUTS (.npy / .npz / images) with a detector."),
    "inspect": ("ufad.runtime.cli.inspect", "inspect_command",
                "Show a detector's method, layers, classes, input spec, threshold, signature."),
    "keygen": ("ufad.runtime.cli.signing", "keygen_command", "Make an Ed25519 key pair for signing detectors."),
    "sign": ("ufad.runtime.cli.signing", "sign_command", "Sign a detector file with a private key."),
    "verify": ("ufad.runtime.cli.signing", "verify_command",
               "Check a detector's integrity (and its signature, with --key)."),
    "triton": ("ufad.runtime.triton", "triton_command", "Write a Triton model repository for a detector."),
    "serve": ("ufad.runtime.cli.serve", "serve_command",
              "Serve a detector over HTTP on Ray Serve (POST /score; needs ufad[ray])."),
    "export": ("ufad.exporter.commands.export", "export_command",
               "Fit a detector for a PyTorch MODEL on ID data and write one .onnx file."),
    "layers": ("ufad.exporter.commands.layers", "layers_command",
               "List a PyTorch MODEL's modules and the layers ufad would monitor."),
    "demo": ("ufad.exporter.commands.demo", "demo_command",
             "Export the reference MNIST detector and score real, noise and adversarial inputs."),
    "eval": ("ufad.exporter.commands.eval", "eval_command",
             "Evaluate every detector on OOD, adversarial and noise sets (RESULTS.md)."),
    "bench": ("ufad.exporter.commands.bench", "bench_command",
              "Time the detector against the bare model and a torch+sklearn host path."),
}
#: options whose CLI spelling is not "--name VALUE" of a same-named option
ALIASES: dict[tuple[str, Any], str] = {
    ("range_check", "off"): "--no-range-check",
}


def cli_renderer(command: click.Command | None):
    """Spell option references (``errors.opt``) as ``command``'s flags: ``min_points`` ->
    ``--min-points``, ``provider='cpu'`` -> ``--provider cpu``."""
    params = {p.name: p for p in (command.params if command else []) if isinstance(p, click.Option)}

    def render(name: str, value: Any) -> str:
        if (name, value) in ALIASES:
            return ALIASES[(name, value)]
        p = params.get(name)
        if p is None:
            return python_style(name, value)
        flag = max(p.opts, key=len)
        if p.is_flag or value is NO_VALUE:
            return flag
        return f"{flag} {value}"
    return render


def _missing_extra(name: str, err: ImportError) -> DependencyError:
    return DependencyError(
        f"`ufad {name}` needs the export extra ({err.name or err} is missing): "
        "pip install 'ufad[export]' (torch pinned to the CPU wheel)."
    )


class UfadGroup(click.Group):
    """Loads a command only when it runs; turns UfadError into one line in CLI words."""

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(COMMANDS))

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return super().get_command(ctx, name)
        module, attr, _ = COMMANDS[name]
        try:
            return getattr(importlib.import_module(module), attr)
        except ImportError as e:
            if e.name and e.name.startswith("ufad."):
                raise  # our own module is missing: a packaging bug, never hide it
            err = _missing_extra(name, e)

            @click.command(name, context_settings={"ignore_unknown_options": True})
            @click.argument("args", nargs=-1, type=click.UNPROCESSED)
            def missing(args):
                raise err
            missing.help = f"(unavailable: {err})"
            return missing

    def format_commands(self, ctx, formatter):
        # The static help lines: importing every command would import torch (~2 s).
        rows = [(name, COMMANDS[name][2]) for name in sorted(COMMANDS)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UfadError as e:
            name = ctx.invoked_subcommand
            command = None
            if name:
                try:
                    command = self.get_command(ctx, name)
                except ImportError:
                    pass
            click.echo(f"error: {e.render(cli_renderer(command))}", err=True)
            ctx.exit(e.exit_code)
        except ImportError as e:
            # A command of the export extra that imports torch (or torchvision, ...) only once
            # it runs: the same one line as when its module itself needs it.
            name = ctx.invoked_subcommand
            if not (name in COMMANDS and COMMANDS[name][0].startswith("ufad.exporter.")
                    and e.name and not e.name.startswith("ufad")):
                raise
            click.echo(f"error: {_missing_extra(name, e)}", err=True)
            ctx.exit(2)
        except MemoryError:
            click.echo("error: out of memory; lower --batch-size or score fewer inputs at once", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=UfadGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ufad")
def main() -> None:
    """ufad: one .onnx file that classifies AND says when the input is garbage
    (out-of-distribution, adversarial or noise)."""


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
