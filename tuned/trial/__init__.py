"""What runs inside a trial process: the worker, the reporter, checkpoints, command
programs, and the template process that forks trials."""
