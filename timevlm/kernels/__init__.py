"""Hand-written CPU kernels for the passes PyTorch's eager operators cannot fuse (see build.py for how they
are built and turned off). Each has a PyTorch fallback that computes the same function."""
