"""What a running tuned process does about signals (standard library only): Ctrl-C held
back across the few steps that must not be cut (`interrupts`), and the named points where a
crash test has the process killed (`failpoints`)."""
