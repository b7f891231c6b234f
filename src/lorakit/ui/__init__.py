"""`lorakit ui`: a local web app to prepare, queue, watch, stop and resume training runs (the `ui` extra)."""
