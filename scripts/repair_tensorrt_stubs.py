"""Repair the generated tensorrt-stubs so that mypy can parse them (see requirements/typecheck.txt).

    python scripts/repair_tensorrt_stubs.py STUBS_DIR

The stubs are produced from pybind11 signatures and have three defects, fixed in place:
CRLF line ends are normalised; parameters named ``in`` (a keyword) become ``in_``;
``add_scale_nd``'s defaulted parameters before the required ``channel_axis`` lose their defaults;
and the module-level ``bool: DataType`` alias, which shadows the builtin in every annotation of
the module, is removed. Running it twice changes nothing.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

STUB_FILES = ("tensorrt/__init__.pyi", "tensorrt_bindings/__init__.pyi", "tensorrt_bindings/tensorrt.pyi")
BOOL_ALIAS = re.compile(r"^bool: [\w.]*DataType\b.*\n", re.MULTILINE)
IN_PARAMETER = re.compile(r"([(,] )in: ")
ADD_SCALE_ND = re.compile(r"^    def add_scale_nd\(.*$", re.MULTILINE)


def repair(text: str) -> str:
    """The stub text with the defects above fixed."""
    text = text.replace("\r\n", "\n")
    text = BOOL_ALIAS.sub("", text)
    text = IN_PARAMETER.sub(r"\1in_: ", text)
    return ADD_SCALE_ND.sub(lambda line: line[0].replace("Weights = None", "Weights | None"), text)


def main(stubs_dir: str) -> None:
    for relative in STUB_FILES:
        path = Path(stubs_dir) / relative
        original = path.read_text()
        repaired = repair(original)
        if repaired != original:
            path.write_text(repaired)
            print(f"repaired {path}")


if __name__ == "__main__":
    main(sys.argv[1])
