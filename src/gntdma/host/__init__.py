"""gntdma.host."""
