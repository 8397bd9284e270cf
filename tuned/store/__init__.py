"""The store: SQLite, the state of record (`tuned.store.database`, whose docstring is the
contract), and the read models the faces answer with (`views`, `export`)."""
