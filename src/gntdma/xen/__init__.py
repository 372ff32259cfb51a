"""gntdma.xen."""
