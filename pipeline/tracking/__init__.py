"""What a run reports: the tracker and its sinks (console and JSON lines, W&B, TensorBoard), the
run's header, the progress line."""
