"""gntdma.toolstack."""
