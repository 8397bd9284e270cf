"""The wire formats (standard library only): the control channel between clients and the
daemon, and the report channel between a trial and its engine."""
