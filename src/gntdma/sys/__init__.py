"""gntdma.sys."""
