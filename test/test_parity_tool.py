"""``bevfusion_ros.tools.parity``: box pairing and relative error (CPU; the GPU tests use them)."""
import numpy as np

from bevfusion_ros.tools.parity import match_boxes, relative_l2


def boxes(rng, count):
    out = rng.normal(size=(count, 11))
    out[:, 9] = rng.integers(0, 3, count)
    out[:, 10] = np.sort(rng.random(count))[::-1]
    return out


def test_match_boxes_pairs_a_permuted_perturbed_list():
    rng = np.random.default_rng(0)
    reference = boxes(rng, 40)
    order = rng.permutation(40)
    other = reference[order] + 1e-6 * rng.normal(size=(40, 11))
    other[:, 9] = reference[order, 9]
    other[:, 6] += 2 * np.pi                          # the same yaw, another turn
    match = match_boxes(other, reference)
    np.testing.assert_array_equal(order[match.index], np.arange(40))
    assert match.fraction_within(1e-5) == 1.0
    assert 1e-7 < match.max_difference(other, reference) < 1e-5


def test_match_boxes_is_one_to_one_and_reports_missing_labels():
    reference = np.zeros((3, 11))
    reference[:, 10] = [0.9, 0.8, 0.7]
    reference[2, 9] = 1                                # a label the other list lacks
    other = reference[:2].copy()
    other[1, 0] = 0.5                                  # second box 0.5 m away
    match = match_boxes(other, reference)
    np.testing.assert_array_equal(match.index, [0, 1, -1])
    np.testing.assert_allclose(match.distance, [0.0, 0.5, np.inf])
    assert match.fraction_within(0.1) == 1 / 3
    assert match.max_difference(other, reference) == 0.5


def test_relative_l2():
    assert relative_l2(np.array([1.0, 1.0]), np.array([1.0, 0.0])) == 1.0
    assert relative_l2(np.zeros(2), np.zeros(3)) == float("inf")
