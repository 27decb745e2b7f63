"""The torch-free client library for the gramstyle gRPC service, and the ``gramstyle`` CLI."""
