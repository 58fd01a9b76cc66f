"""The dev-only stack: service bootstrap, the local API server and the SQS poller."""
