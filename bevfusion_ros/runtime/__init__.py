"""Array plumbing shared by the ops: NumPy/CuPy dispatch (``array_module``), host->device uploads
through pinned staging (``upload``) and malloc tuning for frame-sized buffers (``memory``)."""
