"""The ops dashboard: server-rendered pages over the deletion requests and the model registry."""
