"""What recipes' searches and the evals both measure with: compute counts, the cache keyword."""
