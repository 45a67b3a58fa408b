"""Shared pieces of the command-line front ends: the argument parser and reading an ARCH argument."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nas.arch import Arch
from nas.errors import NasError
from nas.references import REFERENCES, reference


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


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """--target, --space, --threads and --batch, as the latency scripts share them."""
    parser.add_argument("--target", default="cpu", help="execution provider: cpu, cuda, tensorrt, openvino, coreml, "
                                                       "dml, ...")
    parser.add_argument("--space", required=True, help="search-space YAML file")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")


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
