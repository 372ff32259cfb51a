"""gntdma.hv."""
