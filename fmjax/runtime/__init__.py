"""Starting a command: flags and configs (cli), XLA flags, huge pages for malloc,
and joining the processes of a multi-host run (distributed)."""
