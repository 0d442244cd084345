"""Training: the sharded state and step, objectives, optimizer, the loop and its
checkpoints, guards against non-finite steps, preemption and Ctrl-C, workdirs, records
and the profiler switch."""
