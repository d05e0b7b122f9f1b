"""The consumer: takes requests for one model from RabbitMQ, as fast as its vLLM can serve them well."""
