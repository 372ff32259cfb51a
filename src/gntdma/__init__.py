"""gntdma: Xen grant-table bus_dma(9) on an emulated Xen host."""

__all__ = ["__version__"]

__version__ = "0.1.0"
