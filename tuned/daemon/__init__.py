"""`tuned serve`: the loop, its ops, the control socket (server and client), the spool,
systemd notification and the default paths. Importing this package imports nothing more:
`tunectl` loads only `tuned.daemon.client`."""
