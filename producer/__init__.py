"""The producer: publishes job and control messages to RabbitMQ with publisher confirms,
and relays the outbox (jobs accepted while the broker was down)."""
