"""gntdma.xenstored."""
