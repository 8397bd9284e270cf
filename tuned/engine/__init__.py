"""The engine: one experiment driven through an executor, its resources, its group commit."""
