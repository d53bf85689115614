"""fedsim: a federated and privacy-preserving learning simulator built on Flower and PyTorch."""

__version__ = "0.1.0"
