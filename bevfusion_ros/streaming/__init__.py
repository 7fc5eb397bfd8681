"""ROS-free support for a live sensor stream: message synchronisation (``sync``), the transform
buffer (``transforms``), lidar sweep accumulation (``sweeps``), the frame assembler that combines
them (``assembler``), the node's settings (``node_config``) and its inference worker
(``worker``, ``latest_queue``). The ROS node converts messages and delegates to these."""
