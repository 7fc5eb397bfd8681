"""ROS 2 layer of bevfusion_ros: the only place that imports rclpy and ROS message packages."""
