"""Lens distortion of one camera, as ``sensor_msgs/CameraInfo`` states it (``distortion_model``, ``d``).

Models (the coefficient orders of ROS, which are OpenCV's):

* ``plumb_bob``            (k1, k2, p1, p2[, k3]): radial-tangential, OpenCV's 4/5-coefficient model;
* ``rational_polynomial``  (k1, k2, p1, p2, k3, k4, k5, k6): OpenCV's 8-coefficient model;
* ``equidistant``          (k1, k2, k3, k4): OpenCV's ``cv2.fisheye`` model.

A camera whose coefficients are all zero (or empty, whatever the model) is not distorted:
:func:`distortion_from` gives None for it, and the rig's calibration stores None. How a distorted
image is undone: :mod:`bevfusion_ros.camera.undistort`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

#: Supported models and how many coefficients each takes.
DISTORTION_MODELS: dict[str, tuple[int, ...]] = {"plumb_bob": (4, 5), "rational_polynomial": (8,),
                                                 "equidistant": (4,)}


class DistortionError(ValueError):
    """A distortion model that is not supported, or coefficients that do not fit it."""


@dataclass(frozen=True)
class Distortion:
    """The lens distortion of one camera: ``model`` (a key of :data:`DISTORTION_MODELS`) and its
    float ``coefficients`` in ROS/OpenCV order (checked at construction)."""

    model: str
    coefficients: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.model not in DISTORTION_MODELS:
            raise DistortionError(f"unsupported distortion model {self.model!r} "
                                  f"(supported: {', '.join(DISTORTION_MODELS)})")
        counts = DISTORTION_MODELS[self.model]
        if len(self.coefficients) not in counts:
            expected = " or ".join(str(count) for count in counts)
            raise DistortionError(f"distortion model {self.model!r} takes {expected} coefficients, "
                                  f"got {len(self.coefficients)}")
        if not all(math.isfinite(value) for value in self.coefficients):
            raise DistortionError(f"distortion coefficients must be finite, got {list(self.coefficients)}")

    @property
    def is_fisheye(self) -> bool:
        """Whether OpenCV's ``cv2.fisheye`` functions handle the model (``equidistant``)."""
        return self.model == "equidistant"


def distortion_from(model: str, coefficients: Sequence[float]) -> Distortion | None:
    """The :class:`Distortion` of a CameraInfo's ``distortion_model`` and ``d``; None when every
    coefficient is zero (or there are none: then the model is not even looked at). Raises
    :class:`DistortionError` for an unsupported model or coefficients that do not fit it."""
    values = tuple(float(value) for value in coefficients)
    if all(value == 0.0 for value in values):
        return None
    return Distortion(model, values)
