"""The OCI distribution API: a client with lazy Range reads, and an embedded registry server."""
