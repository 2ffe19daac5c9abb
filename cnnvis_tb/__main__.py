"""Command line: ``python -m cnnvis_tb summary MODULE:FACTORY --input 1,3,224,224`` prints a model's layer table.

    python -m cnnvis_tb summary torchvision.models:resnet18
    python -m cnnvis_tb summary torchvision.models:resnet18 --kwargs '{"num_classes": 10}' --input 2,3,64,64
    python -m cnnvis_tb summary path/to/my_models.py:make_net --markdown

``python -m cnnvis_tb export LOGDIR --kind gradcam --layer L --image 0 --out report.html`` writes one
self-contained HTML page (runs × steps grid, captions, trends charts) and ``--gif out.gif`` an animated filmstrip
of one run, read from the event files without a server (:mod:`cnnvis_tb.export`).

The table (layer name, type, output shape, parameter count) comes from one forward pass of a random input of
the given shape, in eval mode and without gradients, with nothing trained and nothing downloaded. Layer names
are the ``named_modules()`` names that ``VisLogger(layers=...)`` takes.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import json
import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


class CommandError(Exception):
    """A user-facing failure of a command (printed without a traceback, exit status 1)."""


# ---------------------------------------------------------------------- argument types
def input_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` → ``(1, 3, 224, 224)``: comma-separated positive integers."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers such as 1,3,224,224 (batch, channels, height, width), "
            f"got {text!r}"
        )
    return tuple(int(p) for p in parts)


def factory_spec(text: str) -> tuple[str, str]:
    """``"package.module:attr.path"`` (or ``"file.py:attr"``) → ``(module, attr)``, checked for form only."""
    module, sep, attr = text.partition(":")
    is_file = module.endswith(".py")
    if not sep or not module or not attr or not _DOTTED.match(attr) or not (is_file or _DOTTED.match(module)):
        raise argparse.ArgumentTypeError(
            f"expected MODULE:FACTORY such as torchvision.models:resnet18 or my_models.py:make_net, got {text!r}"
        )
    return module, attr


def json_kwargs(text: str) -> dict[str, Any]:
    """A JSON object of keyword arguments for the factory."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at position {e.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'expected a JSON object such as {{"num_classes": 10}}, got {text!r}')
    return value


# ---------------------------------------------------------------------- summary
def load_factory(module_name: str, attr: str) -> Callable[..., Any]:
    """Import ``module_name`` (a dotted module name or a ``.py`` file) and return its callable ``attr``."""
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise CommandError(f"no such file: {module_name}")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except CommandError:
        raise
    except Exception as e:  # ImportError, or whatever the module raises while importing
        raise CommandError(f"cannot import {module_name!r}: {type(e).__name__}: {e}") from e
    value: Any = module
    for depth, part in enumerate(attr.split(".")):
        if not hasattr(value, part):
            owner = ".".join([module_name, *attr.split(".")[:depth]])
            close = difflib.get_close_matches(part, [n for n in dir(value) if not n.startswith("_")], n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise CommandError(f"{owner} has no attribute {part!r}{hint}")
        value = getattr(value, part)
    if not callable(value):
        raise CommandError(f"{module_name}:{attr} is a {type(value).__name__}, not a callable returning a model")
    return value


def build_model(module_name: str, attr: str, kwargs: dict[str, Any]):
    """Call the factory with ``kwargs``; the result must be a ``torch.nn.Module``."""
    from torch import nn

    factory = load_factory(module_name, attr)
    call = f"{module_name}:{attr}(**{json.dumps(kwargs)})" if kwargs else f"{module_name}:{attr}()"
    try:
        model = factory(**kwargs)
    except Exception as e:
        raise CommandError(f"{call} raised {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise CommandError(f"{call} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def text_table(traces, model) -> str:
    """The layer table as aligned plain text (children indented under their parents)."""
    rows = [("layer", "type", "output shape", "parameters")]
    for t in traces:
        shape = "×".join(str(s) for s in t.output_shape) if t.output_shape else "-"
        rows.append(("  " * t.name.count(".") + t.name, t.type_name, shape, f"{t.params:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:>{widths[3]}}" for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines.append(f"total: {total:,} parameters ({trainable:,} trainable)")
    return "\n".join(lines)


def summary(args: argparse.Namespace) -> int:
    import torch

    from cnnvis_tb.hooks import first_tensor
    from cnnvis_tb.layers import layer_table, trace_layers
    from cnnvis_tb.safety import preserved

    module_name, attr = args.factory
    model = build_model(module_name, attr, args.kwargs)
    images = torch.randn(args.input, generator=torch.Generator().manual_seed(0))
    try:
        with preserved(model), torch.no_grad():
            traces, output = trace_layers(model, images)
    except Exception as e:
        raise CommandError(
            f"{type(model).__name__} could not run on a random input of shape {list(args.input)}: "
            f"{type(e).__name__}: {e}; give the shape the model expects with --input"
        ) from e
    out = first_tensor(output)
    out_shape = list(out.shape) if out is not None else type(output).__name__
    print(f"{type(model).__name__} from {module_name}:{attr}, input {list(args.input)} -> output {out_shape}\n")
    print(layer_table(model, traces=traces) if args.markdown else text_table(traces, model))
    return 0


# ---------------------------------------------------------------------- export
def non_negative(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a probe index (an integer >= 0), got {text!r}")
    return int(text)


def positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def export(args: argparse.Namespace) -> int:
    """Bad input (unknown kind, layer, image, run or panel; no cnnvis data) exits with status 2, as usage errors do."""
    from cnnvis_tb import export as exporting

    progress = logging.getLogger(exporting.__name__)
    handler = None
    if not args.quiet:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        progress.addHandler(handler)
        previous, progress.propagate = progress.level, False
        progress.setLevel(logging.INFO)
    try:
        selection = exporting.select(args.logdir, args.kind, args.layer, image=args.image, view=args.view,
                                     panel=args.panel, metrics=bool(args.out))  # (lists what is there, if need be)
        if not args.out and not args.gif:
            raise exporting.ExportError(f"nothing to write: {selection.tag} is there ({len(selection.runs)} runs, "
                                        f"{len(selection.steps)} steps); give --out report.html, --gif "
                                        "filmstrip.gif or both")
        if args.gif_run is not None and args.gif_run not in selection.runs:
            raise exporting.ExportError(f"no run {args.gif_run!r} holds {selection.tag}; available runs: "
                                        f"{', '.join(repr(r) for r in selection.runs)}")
        if args.out:
            count = exporting.write_report(selection, args.out)
            print(f"wrote {args.out} ({count} images: {len(selection.runs)} runs × {len(selection.steps)} steps, "
                  f"{len(selection.metrics)} charts)")
        if args.gif:
            count = exporting.write_gif(selection, args.gif, args.gif_run, args.duration, args.gif_scale)
            print(f"wrote {args.gif} ({count} frames of run {args.gif_run or selection.runs[0]!r}, "
                  f"{args.duration} ms each)")
    except exporting.ExportError as e:
        print(f"python -m cnnvis_tb export: error: {e}", file=sys.stderr)
        return 2
    finally:
        if handler is not None:
            progress.removeHandler(handler)
            progress.setLevel(previous)
            progress.propagate = True
    return 0


# ---------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cnnvis_tb",
        description="cnnvis_tb: see what a CNN learns while it trains, in TensorBoard. "
        "Tools that need no training run.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = commands.add_parser(
        "summary",
        help="print a model's layer table (name, type, output shape, parameters)",
        description="Build a model from a factory and print its layers with output shapes from one forward pass "
        "of a random input (eval mode, no gradients; nothing is trained or downloaded). Layer names are "
        "the named_modules() names that VisLogger(layers=...) accepts.",
        epilog="examples:\n"
        "  python -m cnnvis_tb summary torchvision.models:resnet18\n"
        "  python -m cnnvis_tb summary torchvision.models:resnet18 --kwargs '{\"num_classes\": 10}' --input 2,3,64,64\n"
        "  python -m cnnvis_tb summary my_models.py:make_net --markdown",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("factory", type=factory_spec, metavar="MODULE:FACTORY",
                   help="a callable returning a torch.nn.Module, e.g. torchvision.models:resnet18 "
                   "(MODULE may be a path to a .py file)")
    p.add_argument("--input", type=input_shape, default=(1, 3, 224, 224), metavar="N,C,H,W",
                   help="shape of the random input (default: 1,3,224,224)")
    p.add_argument("--kwargs", type=json_kwargs, default={}, metavar="JSON",
                   help='keyword arguments for the factory as a JSON object, e.g. \'{"num_classes": 10}\'')
    p.add_argument("--markdown", action="store_true",
                   help="print the Markdown table that VisLogger logs to TensorBoard's Text tab")
    p.set_defaults(run=summary)

    p = commands.add_parser(
        "export",
        help="write a self-contained HTML report (and/or an animated GIF) of one picture series of a log dir",
        description="Read a log dir's event files (TensorBoard's own loader, every step kept) and write, without a "
        "server, one HTML page with the runs × steps grid of one picture series (pictures inlined, captions as "
        "text, trends charts of the kind's metrics for that layer; no script, nothing loaded from the network) "
        "and/or an animated GIF of one run (one frame per logged step, the step number on each). Unknown kinds, "
        "layers, images, runs or panels, and log dirs without cnnvis data, exit with status 2 and list what is "
        "there.",
        epilog="examples:\n"
        "  python -m cnnvis_tb export runs/ --kind gradcam --layer layer4 --image 0 --out report.html\n"
        "  python -m cnnvis_tb export runs/ --kind gradcam --layer layer4 --image 0 --panel gradcam/true "
        "--gif cam.gif --run baseline\n"
        "  python -m cnnvis_tb export runs/ --kind kernels --layer conv1 --view grid --out kernels.html",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("logdir", metavar="LOGDIR", help="the log dir (the folder holding the run folders)")
    p.add_argument("--kind", help="the kind, e.g. gradcam, kernels, features (omit it to list them)")
    p.add_argument("--layer", help="the layer (its named_modules() name; omit it to list them)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--image", type=non_negative, metavar="INDEX",
                       help="a probe image by index (view probe_<INDEX>)")
    which.add_argument("--view", metavar="NAME", help='a view that is not one probe image, e.g. "grid", "channels"')
    p.add_argument("--panel", metavar="KEY",
                   help='show one panel of each picture alone, e.g. "gradcam/true" (cut with its panel record)')
    p.add_argument("--out", metavar="HTML", help="write the HTML report here")
    p.add_argument("--gif", metavar="GIF", help="write an animated filmstrip of one run here")
    p.add_argument("--run", dest="gif_run", metavar="NAME",
                   help="the run of the GIF (default: the first run in natural order)")
    p.add_argument("--duration", type=positive, default=500, metavar="MS",
                   help="milliseconds per GIF frame (default: 500)")
    p.add_argument("--gif-scale", type=positive, default=None, metavar="N",
                   help="upscale GIF frames N× (default: so that frames are about 128 px tall or more)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    p.set_defaults(run=export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors exit with status 2
    try:
        return args.run(args)
    except CommandError as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
