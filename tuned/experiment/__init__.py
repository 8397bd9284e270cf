"""An experiment's spec: its data and checks, reading spec files, loading the entry."""
