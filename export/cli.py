"""``rnnserve export``: the command-line face of :func:`rnnserve.export.export`."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from torch import nn

from rnnserve.export.api import FORMATS, export, export_examples
from rnnserve.export.errors import ExportError, ExportUsageError, SizeInferenceError
from rnnserve.export.sequence import SequenceExportable
from rnnserve.export.step import Exportable
from rnnserve.manifest import ModelManifest

EPILOG = """\
examples:
  rnnserve export rnnserve.examples.models:gru2 --name gru2 --repository model_repository
  rnnserve export ./my_models.py:make_model --repository model_repository --format torchscript --input-size 8
  rnnserve export --all-examples --repository model_repository --format onnx --version 1 --overwrite

FACTORY is a function (or class) called with no arguments, or a module-level object. It must give an
nn.RNN/nn.LSTM/nn.GRU, an nn.RNNCell/LSTMCell/GRUCell, a cell (x, h) -> h or (y, h), an nn.ModuleList of
cells, or an rnnserve.export.Exportable (e.g. adapt(model.rnn, head=model.fc)), or a whole-sequence model
as an rnnserve.export.SequenceExportable (adapt_sequence(...); served by Predict).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("target", nargs="?", metavar="MODULE_OR_FILE:FACTORY", help="what to export")
    parser.add_argument("--all-examples", action="store_true", help="export every built-in example instead")
    parser.add_argument("--repository", required=True, type=Path, help="model repository folder")
    parser.add_argument("--name", help="model name in the repository (default: the factory's name)")
    parser.add_argument("--format", choices=sorted(FORMATS), default="onnx", help="artifact format (default onnx)")
    parser.add_argument("--version", type=int, help="version number (default: one past the highest)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing version")
    parser.add_argument("--input-size", type=int, help="input size of a user cell, when it cannot be inferred")
    parser.add_argument("--hidden-size", type=int, help="hidden size of a user cell, when it cannot be inferred")
    parser.add_argument("--steps", type=int, help="verification steps of a step model (default 50)")
    parser.add_argument("--batch-sizes", default="1,4", help="verification batch sizes, comma-separated (default 1,4)")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="max abs error allowed (default 1e-5)")
    parser.add_argument("--max-batch-size", type=int, help="manifest max_batch_size (default 256)")
    parser.add_argument(
        "--max-queue-delay-us", type=int, help="manifest max_queue_delay_us of a step model (default 0)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        return _fail(f"--batch-sizes {args.batch_sizes!r}: expected integers separated by commas, e.g. 1,4", 2)
    model: object = None
    try:
        if args.all_examples:
            if args.target or args.name:
                return _fail("--all-examples names its models itself: give no MODULE_OR_FILE:FACTORY or --name", 2)
            refused = _given(args, "input_size", "hidden_size", "max_batch_size", "max_queue_delay_us")
            if refused:
                return _fail(
                    f"{refused} cannot apply to --all-examples: the examples are exported as adapted, with "
                    "default manifest settings",
                    2,
                )
            paths = export_examples(
                args.repository,
                [args.format],
                version=args.version,
                overwrite=args.overwrite,
                **_optional(args, "steps"),
                batch_sizes=batch_sizes,
                tolerance=args.tolerance,
                progress=not args.quiet,
            )
            for p in paths:
                _note_other_versions(p)
            print("\n".join(str(p) for p in paths))
            return 0
        if not args.target:
            return _fail("nothing to export: give MODULE_OR_FILE:FACTORY, or --all-examples", 2)
        model, factory_name = load_target(args.target)
        refused = _given(args, "steps", "max_queue_delay_us") if isinstance(model, SequenceExportable) else ""
        if refused:
            return _fail(
                f"{refused} cannot apply to {args.target}: a whole-sequence model is verified over whole padded "
                "sequences, and Predict runs it without the session batcher",
                2,
            )
        path = export(
            model,
            name=args.name or factory_name,
            repository=args.repository,
            format=args.format,
            version=args.version,
            overwrite=args.overwrite,
            input_size=args.input_size,
            hidden_size=args.hidden_size,
            batch_sizes=batch_sizes,
            tolerance=args.tolerance,
            source=args.target,
            progress=not args.quiet,
            **_optional(args, "steps", "max_batch_size", "max_queue_delay_us"),
        )
    except ExportUsageError as exc:
        return _fail(f"--{exc.argument.replace('_', '-')} cannot apply to {args.target}: {exc.reason}", 2)
    except SizeInferenceError as exc:
        if not exc.sizes_help:
            return _fail(str(exc), 1)
        if isinstance(model, nn.Module):  # this command adapted it, so the flags reach adapt()
            return _fail(f"{exc} (CLI: --input-size/--hidden-size)", 1)
        # Raised by the factory's own adapt() call, which the flags cannot reach.
        return _fail(
            f"{args.target}: {exc} (in the factory's adapt() call: --input-size/--hidden-size do not reach it)", 1
        )
    except ExportError as exc:
        return _fail(str(exc), 1)
    _note_other_versions(path)
    print(path)
    return 0


def _note_other_versions(path: Path) -> None:
    """Say so when the version just written at ``path`` is not its model's only one: exporting another format
    of a model adds a version, and new sessions that ask for no version get the newest."""
    model_dir, version = path.parent, int(path.name)
    others = sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and int(p.name) != version)
    if not others:
        return
    newest = max(version, *others)
    name, written = model_dir.name, _format_of(path)
    print(
        f"rnnserve export: note: wrote {name} version {version} ({written}) beside version "
        f"{', '.join(f'{v} ({_format_of(model_dir / str(v))})' for v in others)}. New sessions that ask for "
        f"no version get the newest, version {newest}. To keep this export as a model of its own, give it "
        f"another --name (e.g. {name}_{written}); to replace a version instead, pass --version N --overwrite.",
        file=sys.stderr,
    )


def _format_of(folder: Path) -> str:
    try:
        return ModelManifest.read(folder).format
    except (OSError, ValueError):  # no or no valid manifest (a hand-made folder): not worth failing over
        return "?"


def _given(args: argparse.Namespace, *names: str) -> str:
    """The flags among ``names`` given on the command line (those default to None), as written there."""
    return ", ".join(f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is not None)


def _optional(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The flags among ``names`` that were given, as keyword arguments; the others keep export()'s defaults."""
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _fail(message: str, code: int) -> int:
    print(f"rnnserve export: error: {message}", file=sys.stderr)
    return code


def load_target(target: str) -> tuple[nn.Module | Exportable | SequenceExportable, str]:
    """Resolve ``MODULE_OR_FILE:FACTORY`` to the model it gives, and the factory's name."""
    where, sep, attr = target.rpartition(":")
    if not sep or not where or not attr:
        raise ExportError(f"{target!r}: expected MODULE_OR_FILE:FACTORY, e.g. rnnserve.examples.models:gru2")
    module = _load_module(where)
    if not hasattr(module, attr):
        public = sorted(n for n in vars(module) if not n.startswith("_"))
        raise ExportError(f"{where} has no {attr!r}; it defines {public}")
    obj = getattr(module, attr)
    if not isinstance(obj, nn.Module | Exportable | SequenceExportable) and callable(obj):
        try:
            obj = obj()
        except TypeError as exc:
            raise ExportError(f"calling {target}() failed ({exc}): the factory must take no arguments") from exc
    if not isinstance(obj, nn.Module | Exportable | SequenceExportable):
        raise ExportError(
            f"{target} gave a {type(obj).__name__}; it must give an nn.Module or an rnnserve.export.Exportable"
        )
    return obj, attr


def _load_module(where: str) -> object:
    path = Path(where)
    if where.endswith(".py") or path.exists():
        if not path.is_file():
            raise ExportError(f"{where}: no such Python file")
        # The file's folder goes on sys.path so that it can import its neighbours.
        sys.path.insert(0, str(path.resolve().parent))
        spec = importlib.util.spec_from_file_location(f"_rnnserve_target_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module
    # As `python -m` does, the current folder goes first on sys.path, so that `rnnserve export my_models:f`
    # finds ./my_models.py: the console script's sys.path starts with its own bin folder instead.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as exc:
        raise ExportError(
            f"cannot import {where!r} ({exc}); give a dotted module name or a path to a .py file"
        ) from exc
