"""Signed deletion certificates: a document a third party verifies offline (JWS, Ed25519, over RFC 8785
canonical JSON), the keys that sign them, and the endpoints that serve both."""
