"""Start bevfusion_node with the nuScenes parameters.

    ros2 launch bevfusion_ros nuscenes.launch.py [model_dir:=DIR] [backend:=auto] \
        [params_file:=FILE] [use_sim_time:=true] [lidar_topic:=/LIDAR_TOP]

Every parameter is documented in config/nuscenes.yaml. ``use_sim_time:=true`` for bag replay
(``ros2 bag play --clock`` or ``bevfusion-play --clock``). Detections appear on
``/bevfusion/detections``, markers on ``/bevfusion/markers``.
"""
from pathlib import Path

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

from launch import LaunchDescription


def generate_launch_description() -> LaunchDescription:
    share = Path(get_package_share_directory("bevfusion_ros"))
    arguments = [
        DeclareLaunchArgument("params_file", default_value=str(share / "config" / "nuscenes.yaml"),
                              description="node parameters (the geometry comes from the model "
                                          "folder's bevfusion.yaml)"),
        DeclareLaunchArgument("model_dir", default_value="out/models/nuscenes-r50-fp16",
                              description="CUDA-BEVFusion model folder"),
        DeclareLaunchArgument("backend", default_value="auto", description="auto | tensorrt | gpu | cpu"),
        DeclareLaunchArgument("lidar_topic", default_value="/LIDAR_TOP"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="true for bag replay"),
        DeclareLaunchArgument("detections_topic", default_value="/bevfusion/detections",
                              description="where ~/detections is published"),
    ]
    node = Node(
        package="bevfusion_ros",
        executable="bevfusion_node",
        name="bevfusion",
        output="screen",
        emulate_tty=True,
        parameters=[
            LaunchConfiguration("params_file"),
            {"node.model_dir": LaunchConfiguration("model_dir"),
             "node.backend": LaunchConfiguration("backend"),
             "node.lidar_topic": LaunchConfiguration("lidar_topic"),
             "use_sim_time": ParameterValue(LaunchConfiguration("use_sim_time"), value_type=bool)},
        ],
        remappings=[("~/detections", LaunchConfiguration("detections_topic"))],
    )
    return LaunchDescription([*arguments, node])
