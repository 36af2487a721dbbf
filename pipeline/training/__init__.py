"""Training: the step (engine), the run that wires its parts (trainer), model selection,
checkpoints, the run directory's lock, stop requests and profiling."""
