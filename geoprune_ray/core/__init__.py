"""The method in pure PyTorch + torch-pruning: no Ray is imported anywhere under ``core``."""
