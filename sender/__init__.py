"""The sender: an OpenAI-compatible HTTP front that queues requests in RabbitMQ by priority."""
