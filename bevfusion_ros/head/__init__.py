"""Detection head post-processing: box decoding (spec 6.3)."""
from bevfusion_ros.head.decode import BOX_COLUMNS, HEAD_OUTPUT_CHANNELS, decode_boxes

__all__ = ["BOX_COLUMNS", "HEAD_OUTPUT_CHANNELS", "decode_boxes"]
