"""Offline analysis of detections: nuScenes-style metrics (``evaluation``) and drawings
(``visualize``)."""
