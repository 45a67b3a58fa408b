"""Shared pieces of the command-line front ends: the argument parser, the latency scripts' shared options,
and reading an ARCH argument."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from nas.arch import Arch
from nas.errors import NasError
from nas.references import REFERENCES, reference

if TYPE_CHECKING:  # importing them here would load ONNX Runtime for every script
    from nas.latency.targets import Target
    from nas.space import SearchSpace


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where the help does not already say it and X is not None."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or "default" in text:
            return text
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one line and exit status 2 for a bad option, like every other bad input."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message: str) -> None:
        self.exit(2, f"error: {message} (see --help)\n")


def add_table_arguments(parser: argparse.ArgumentParser) -> None:
    """The options build_lut.py and validate_lut.py share: --target, --space, --threads, --batch,
    --resolution, --num-classes (``table_arguments`` reads them) and --quiet."""
    parser.add_argument("--target", default="cpu", help="execution provider: cpu, cuda, tensorrt, openvino, coreml, "
                                                       "dml, ...")
    parser.add_argument("--space", required=True, help="search-space YAML file")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--resolution", type=int, help="input resolution (default: the space's)")
    parser.add_argument("--num-classes", type=int, help="classifier width (default 1000 at >= 224 px, else 10)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def table_arguments(args: argparse.Namespace) -> tuple[Target, SearchSpace, int, int]:
    """The (target, space, resolution, num_classes) that ``add_table_arguments``' options name."""
    from nas.latency.build import default_num_classes
    from nas.latency.targets import get_target
    from nas.space import load_space

    target = get_target(args.target, args.threads, args.batch)
    space = load_space(args.space)
    resolution = args.resolution or space.resolution
    return target, space, resolution, args.num_classes or default_num_classes(resolution)


def parse_with_progress(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv`` and show the library's progress (its INFO log records) on stderr, as the latency
    scripts do."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args


def parse_arch_argument(text: str) -> Arch:
    """A reference name, a canonical architecture string, or a JSON file (an Arch, or {"arch": STRING})."""
    if text in REFERENCES:
        return reference(text)
    path = Path(text)
    if text.endswith(".json") or path.is_file():
        if not path.is_file():
            raise NasError(f"{text}: no such file; ARCH is a reference name ({', '.join(REFERENCES)}), "
                           "a canonical architecture string or a JSON file")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise NasError(f"{text}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if isinstance(data, dict) and isinstance(data.get("arch"), str):
            return Arch.parse(data["arch"])
        if isinstance(data, dict) and "layers" in data:
            try:
                return Arch.from_dict(data)
            except (TypeError, KeyError, ValueError) as exc:
                raise NasError(f"{text}: not an architecture JSON object ({exc})") from None
        raise NasError(f"{text}: expected a JSON object with an 'arch' string or an architecture's 'layers'")
    if not text.startswith("i"):
        raise NasError(f"unknown architecture {text!r}: not a reference name ({', '.join(REFERENCES)}), "
                       "not a file, and not an architecture string (they start with the resolution, e.g. 'i224-...')")
    return Arch.parse(text)
