"""Hand-written CPU kernels for the passes PyTorch's eager operators cannot fuse, and the allocator setting the
CPU step wants (memory.py). build.py says how they are built, cached and turned off; each has a PyTorch
fallback that computes the same function (tests/test_kernels.py)."""
