"""Side-by-side benchmarks: mmformer against the implementation users would otherwise pick, in one process."""
