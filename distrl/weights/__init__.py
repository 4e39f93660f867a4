"""Weights between roles: versioned tensors, broadcast groups, and publishing them to workers."""
