"""recserve: train recommenders on interaction logs and serve them over gRPC."""

__version__ = "0.1.0"
