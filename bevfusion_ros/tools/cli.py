"""What the command-line tools share: user errors become one ``error: ...`` line and exit 1."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from bevfusion_ros.config import ConfigError
from bevfusion_ros.engines import EngineError
from bevfusion_ros.io import CalibrationError, FrameError, TensorFileError
from bevfusion_ros.pipeline import InputError, ModelDirError

USER_ERRORS = (ModelDirError, EngineError, ConfigError, FrameError, CalibrationError, TensorFileError,
               InputError)
"""Bad model folders, data, configuration or input: reported, not a traceback."""


def run_reporting_errors(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``run(args)`` with INFO logging (e.g. the backend choice); a user error prints one line
    on stderr and gives exit status 1."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return run(args)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
