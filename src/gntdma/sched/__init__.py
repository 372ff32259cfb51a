"""gntdma.sched."""
