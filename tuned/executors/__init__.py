"""Executors: where trials run, behind the engine's `Executor` protocol
(`tuned.engine.executor`): `local` forks children of this process, `template` asks a
template process (the daemon's) or a fork server (the in-process API's) for them,
`simulated` runs step functions on a virtual clock. `host` and `gpus` say what this machine
offers."""
