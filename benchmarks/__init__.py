"""Benchmarks: the server under load against the model's own batched-forward limit (`python -m benchmarks.run`)."""
