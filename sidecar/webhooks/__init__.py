"""Webhooks: signing, the durable queue (memory or Redis Streams), the delivery worker."""
