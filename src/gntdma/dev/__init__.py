"""gntdma.dev."""
