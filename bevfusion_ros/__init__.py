"""bevfusion_ros: BEVFusion (6 cameras + lidar -> 3D boxes) as a ROS 2 perception package.

The package root and everything outside ``bevfusion_ros.ros`` is ROS-free: it imports
without rclpy, so the pipeline can be used and tested on its own.
"""
__version__ = "0.1.0"
