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
exchange, requests whose client went away, and the cancellations are also kept
in a bounded stream (:data:`CANCEL_STREAM`) that a consumer reads when it starts.
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
    CANCEL_STREAM,
    CANCEL_STREAM_ARGUMENTS,
    CONTROL_EXCHANGE,
    DEAD_LETTER_QUEUE,
    DEFAULT_BROKER_MAX_MESSAGE_SIZE,
    DEFAULT_MAX_PRIORITY,
    DEFAULT_RABBITMQ_URL,
    MESSAGE_ENVELOPE_BYTES,
    QUEUE_PREFIX,
    REPLY_QUEUE_EXPIRES_MS,
    REPLY_QUEUE_PREFIX,
    ROLLCALL_KEY,
    VERSION,
    WIRE_PRIORITY_CEILING,
    demotion_for_backlog,
    fairness_sublevels,
    model_queue,
    servable_model_name,
    user_level,
    wire_max_priority,
    wire_priority,
)
from contract.queues import QueueType, model_queue_arguments

__all__ = [
    "ANNOUNCE_KEY",
    "CANCEL_KEY",
    "CANCEL_STREAM",
    "CANCEL_STREAM_ARGUMENTS",
    "CONTROL_EXCHANGE",
    "DEAD_LETTER_QUEUE",
    "DEFAULT_BROKER_MAX_MESSAGE_SIZE",
    "DEFAULT_MAX_PRIORITY",
    "DEFAULT_RABBITMQ_URL",
    "H_CONSUMER",
    "H_DEADLINE",
    "H_REJECTED",
    "H_REQUEST_ID",
    "MESSAGE_ENVELOPE_BYTES",
    "QUEUE_PREFIX",
    "REPLY_QUEUE_EXPIRES_MS",
    "REPLY_QUEUE_PREFIX",
    "ROLLCALL_KEY",
    "VERSION",
    "WIRE_PRIORITY_CEILING",
    "Announcement",
    "Cancel",
    "ContractError",
    "QueueType",
    "Reply",
    "Request",
    "demotion_for_backlog",
    "fairness_sublevels",
    "model_queue",
    "model_queue_arguments",
    "rejected_properties",
    "request_id_of",
    "rollcall_message",
    "servable_model_name",
    "user_level",
    "wire_max_priority",
    "wire_priority",
]
