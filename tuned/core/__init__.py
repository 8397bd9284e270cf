"""The pure core: search spaces, trial arguments, decisions and states, searchers and
schedulers. Only the standard library and numpy: no I/O, processes, threads or clock."""
