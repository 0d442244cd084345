"""Training: the sharded state and step, objectives, optimizer, the loop and its
checkpoints, guards against non-finite steps, preemption, workdirs and records."""
