"""Speed work kept apart from the pipeline: the fused CPU conv kernels (their C++ in csrc/ and a
build per instruction set), the CPU allocator setting, and the benchmark."""
