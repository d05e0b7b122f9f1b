"""The message contract between the sender and the consumers.

Everything that travels through RabbitMQ is defined here, so the two sides
cannot drift apart; ``docs/protocol.md`` describes the same contract in prose.

- :mod:`contract.names`: queues, exchange, routing keys, the priority scale.
- :mod:`contract.messages`: request, reply pieces, cancellation, announcement
  and roll call, each with its AMQP properties built and parsed.
- :mod:`contract.queues`: quorum or classic, and the arguments each of our durable queues takes.
- :mod:`contract.liveness`: the queue that lives exactly as long as a consumer connection.
- :mod:`contract.errors`: the error catalogue both services answer from.

Requests go to one durable priority queue per model (:func:`model_queue`).
Replies go to the ``reply_to`` queue of the sender that asked, as one or more
messages with the request's ``correlation_id``, numbered from 0; the last one
says so. Consumers announce themselves on the control exchange so senders can
list the models that are being served right now; senders cancel, on the same
exchange, requests whose client went away.
"""

from contract.messages import (
    H_CONSUMER,
    H_DEADLINE,
    H_REJECTED,
    H_REQUEST_ID,
    Announcement,
    Cancel,
    ContractError,
    Reply,
    Request,
    rejected_properties,
    request_id_of,
    rollcall_message,
)
from contract.names import (
    ANNOUNCE_KEY,
    CANCEL_KEY,
    CONTROL_EXCHANGE,
    DEAD_LETTER_QUEUE,
    DEFAULT_MAX_PRIORITY,
    DEFAULT_RABBITMQ_URL,
    QUEUE_PREFIX,
    REPLY_QUEUE_EXPIRES_MS,
    REPLY_QUEUE_PREFIX,
    ROLLCALL_KEY,
    VERSION,
    model_queue,
    servable_model_name,
)
from contract.queues import QueueType, model_queue_arguments

__all__ = [
    "ANNOUNCE_KEY",
    "CANCEL_KEY",
    "CONTROL_EXCHANGE",
    "DEAD_LETTER_QUEUE",
    "DEFAULT_MAX_PRIORITY",
    "DEFAULT_RABBITMQ_URL",
    "H_CONSUMER",
    "H_DEADLINE",
    "H_REJECTED",
    "H_REQUEST_ID",
    "QUEUE_PREFIX",
    "REPLY_QUEUE_EXPIRES_MS",
    "REPLY_QUEUE_PREFIX",
    "ROLLCALL_KEY",
    "VERSION",
    "Announcement",
    "Cancel",
    "ContractError",
    "QueueType",
    "Reply",
    "Request",
    "model_queue",
    "model_queue_arguments",
    "rejected_properties",
    "request_id_of",
    "rollcall_message",
    "servable_model_name",
]
