"""Inference services that serve a model: registered, and acknowledging the version they serve
(every acknowledgement kept: who served what, from when to when)."""
