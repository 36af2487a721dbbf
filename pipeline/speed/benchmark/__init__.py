"""The speed benchmark (`python -m pipeline.bench`): its cases, the trainers it times, and the
results table."""
