"""Lidar branch, deploy side (no torch): the SCN ONNX graph reader."""
from bevfusion_ros.lidar.scn_graph import ScnLayer, ScnNode, read_scn_onnx

__all__ = ["ScnLayer", "ScnNode", "read_scn_onnx"]
