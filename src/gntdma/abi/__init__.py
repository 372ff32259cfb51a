"""gntdma.abi."""
