"""A user's models, in the package name most PyTorch projects use (trainyard's own live
under `trainyard.models`, so the two never meet)."""
