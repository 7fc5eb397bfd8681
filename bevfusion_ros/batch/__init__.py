"""Batch re-inference and evaluation of many bags on Ray (``bevfusion-batch``, docs/batch.md).

ROS-free and Ray-free at import: :mod:`.settings` (what a run depends on, from the node's
parameter files), :mod:`.outputs` (bags, output files, resuming), :mod:`.progress`,
:mod:`.scoring` (``--eval``) and :mod:`.ray_runner` (Ray, imported inside its functions). The
unit of work, one bag through one pipeline, is :mod:`bevfusion_ros.ros.bag_inference`.
"""
