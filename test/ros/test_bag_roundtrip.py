"""Issue 7's round trip: example data -> bevfusion-make-bag -> bevfusion-play (a process) ->
bevfusion_node (a process) -> detections equal to the core pipeline's on the same frame; the
bag's schemas are the real ROS 2 definitions (mcap-ros2-support decodes every message)."""
from __future__ import annotations

import subprocess
import sys

import pytest
from node_harness import FRAME_TIMEOUT_S, NodeUnderTest, assert_same_boxes

from bevfusion_ros.ros.bag import bag_summary
from bevfusion_ros.streaming.node_config import NUSCENES_CAMERA_TOPICS
from bevfusion_ros.tools import make_bag

mcap_ros2_reader = pytest.importorskip("mcap_ros2.reader")

EXPECTED_TYPES = {"/LIDAR_TOP": "sensor_msgs/msg/PointCloud2", "/tf_static": "tf2_msgs/msg/TFMessage",
                  **{topic: "sensor_msgs/msg/Image" for topic in NUSCENES_CAMERA_TOPICS},
                  **{topic.rsplit("/", 1)[0] + "/camera_info": "sensor_msgs/msg/CameraInfo"
                     for topic in NUSCENES_CAMERA_TOPICS}}


def test_example_bag_through_play_and_node(example_data_dir, tiny_model_dir, node_example, tiny_core, tmp_path):
    bag = tmp_path / "example.mcap"
    assert make_bag.main([str(example_data_dir), "--out", str(bag)]) in (0, None)
    summary = bag_summary(bag)
    assert {topic: type_name for topic, (type_name, _) in summary.items()} == EXPECTED_TYPES
    decoded = {}
    with bag.open("rb") as stream:                     # the independent reader parses the schemas
        for message in mcap_ros2_reader.read_ros2_messages(stream):
            decoded.setdefault(message.channel.topic, message.ros_msg)
    assert decoded["/LIDAR_TOP"].width == len(node_example.points)
    assert (decoded["/CAM_FRONT/image_raw"].width, decoded["/CAM_FRONT/image_raw"].encoding) == (1600, "rgb8")

    harness = NodeUnderTest(tiny_model_dir, tmp_path / "node", "zero_fill", lidar_topic="/LIDAR_TOP",
                            camera_topics=list(NUSCENES_CAMERA_TOPICS))
    player = None
    try:
        assert harness.spin_until(lambda: harness.node.count_subscribers("/LIDAR_TOP") > 0, 60.0)
        player = subprocess.Popen([sys.executable, "-m", "bevfusion_ros.tools.play", str(bag), "--start-delay", "1",
                                   "--wait-for-subscribers", "30"],
                                  env=harness.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert harness.spin_until(lambda: len(harness.detections) > 0, FRAME_TIMEOUT_S + 30)
        stamp, msg = next(iter(harness.detections.items()))
        assert msg.header.frame_id == "lidar_top"
        assert_same_boxes(msg, tiny_core.forward(node_example))
        assert harness.spin_until(lambda: stamp in harness.frame_infos, 5.0)
        assert len(harness.frame_infos[stamp].cameras_used) == 6
        player_output = player.communicate(timeout=30)[0].decode(errors="replace")
        assert player.returncode == 0, player_output
    finally:
        if player is not None and player.poll() is None:
            player.kill()
        output = harness.close()
    assert "Traceback" not in output, output
