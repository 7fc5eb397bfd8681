"""The managed node across processes (configure, activate, output only while active, the
calibration kept over a deactivation, cleanup, shutdown) and the declared parameters (described,
read-only ones refused, a run-time score threshold applied to the next frame)."""
from __future__ import annotations

import dataclasses

import numpy as np
from lifecycle_msgs.msg import State, Transition
from lifecycle_msgs.srv import ChangeState, GetState
from node_harness import FRAME_TIMEOUT_S, NodeUnderTest, assert_same_boxes, set_parameter
from rcl_interfaces.msg import ParameterType, ParameterValue
from rcl_interfaces.srv import DescribeParameters

STAMP_NS = 1_700_000_000_000_000_000
PERIOD_NS = 100_000_000


def transition(harness: NodeUnderTest, transition_id: int) -> bool:
    return harness.call(ChangeState, "/bevfusion/change_state", ChangeState.Request(
        transition=Transition(id=transition_id))).success


def state(harness: NodeUnderTest) -> int:
    return harness.call(GetState, "/bevfusion/get_state", GetState.Request()).current_state.id


def test_managed_node_outputs_only_while_active_and_keeps_its_calibration(tiny_model_dir, tmp_path, node_example,
                                                                          tiny_core):
    harness = NodeUnderTest(tiny_model_dir, tmp_path, "zero_fill", managed=True)
    try:
        assert state(harness) == State.PRIMARY_STATE_UNCONFIGURED
        assert harness.cloud_pub.get_subscription_count() == 0
        assert transition(harness, Transition.TRANSITION_CONFIGURE)
        assert state(harness) == State.PRIMARY_STATE_INACTIVE
        assert transition(harness, Transition.TRANSITION_ACTIVATE)
        harness.wait_ready()
        harness.publish(node_example, STAMP_NS)
        assert harness.spin_until(lambda: STAMP_NS in harness.detections, FRAME_TIMEOUT_S)
        assert_same_boxes(harness.detections[STAMP_NS], tiny_core.forward(node_example))

        assert transition(harness, Transition.TRANSITION_DEACTIVATE)
        assert harness.spin_until(lambda: harness.cloud_pub.get_subscription_count() == 0, FRAME_TIMEOUT_S)
        inactive_stamp = STAMP_NS + PERIOD_NS
        harness.publish(node_example, inactive_stamp)                 # nobody subscribes: never answered
        assert transition(harness, Transition.TRANSITION_ACTIVATE)
        harness.wait_ready()
        active_stamp = STAMP_NS + 2 * PERIOD_NS
        harness.publish(node_example, active_stamp, camera_infos=False)    # K from before the deactivation
        assert harness.spin_until(lambda: active_stamp in harness.frame_infos and active_stamp in harness.detections,
                                  FRAME_TIMEOUT_S)
        assert inactive_stamp not in harness.detections
        assert tuple(harness.frame_infos[active_stamp].cameras_used) == harness.cameras
        assert_same_boxes(harness.detections[active_stamp], tiny_core.forward(node_example))

        assert transition(harness, Transition.TRANSITION_DEACTIVATE)
        assert transition(harness, Transition.TRANSITION_CLEANUP)
        assert state(harness) == State.PRIMARY_STATE_UNCONFIGURED
        assert transition(harness, Transition.TRANSITION_UNCONFIGURED_SHUTDOWN)
        assert state(harness) == State.PRIMARY_STATE_FINALIZED
    finally:
        output = harness.close()
    assert "Traceback" not in output, output


def test_parameters_are_described_and_the_score_threshold_changes_at_run_time(tiny_model_dir, tmp_path, node_example,
                                                                             tiny_core):
    harness = NodeUnderTest(tiny_model_dir, tmp_path, "zero_fill")
    try:
        harness.wait_ready()
        described = harness.call(DescribeParameters, "/bevfusion/describe_parameters", DescribeParameters.Request(
            names=["head.score_threshold", "node.num_sweeps", "node.camera_topics"])).descriptors
        threshold, sweeps, topics = described
        assert threshold.type == ParameterType.PARAMETER_DOUBLE and not threshold.read_only
        assert (threshold.floating_point_range[0].from_value, threshold.floating_point_range[0].to_value) == (0.0, 1.0)
        assert sweeps.type == ParameterType.PARAMETER_INTEGER and sweeps.read_only and "sweeps" in sweeps.description
        assert topics.type == ParameterType.PARAMETER_STRING_ARRAY and topics.read_only

        refused = set_parameter(harness, "node.num_sweeps", ParameterValue(
            type=ParameterType.PARAMETER_INTEGER, integer_value=3))
        assert not refused.successful and "read-only" in refused.reason.lower().replace("read only", "read-only")
        out_of_range = set_parameter(harness, "head.score_threshold", ParameterValue(
            type=ParameterType.PARAMETER_DOUBLE, double_value=1.5))
        assert not out_of_range.successful

        everything = tiny_core.forward(node_example)
        all_boxes = everything.boxes
        cut = float(np.median(all_boxes[:, 10]))
        assert set_parameter(harness, "head.score_threshold", ParameterValue(
            type=ParameterType.PARAMETER_DOUBLE, double_value=cut)).successful
        harness.publish(node_example, STAMP_NS)
        assert harness.spin_until(lambda: STAMP_NS in harness.detections, FRAME_TIMEOUT_S)
        kept = all_boxes[:, 10] >= cut
        assert 0 < kept.sum() < len(all_boxes)
        assert_same_boxes(harness.detections[STAMP_NS], dataclasses.replace(everything, boxes=all_boxes[kept]))
    finally:
        output = harness.close()
    assert "Traceback" not in output, output
