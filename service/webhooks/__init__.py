"""Signed webhooks to compliance tools (Standard Webhooks): subscriptions, an outbox of deliveries
written in the same transaction as the change they announce, and the relay that sends them."""
