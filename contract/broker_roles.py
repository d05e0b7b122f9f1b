"""The broker users of the dispatcher and the least each one needs (RabbitMQ permission regexes).

One source for the chart's ``Permission``/``TopicPermission`` objects, compose's users and the
test that proves them on a real broker (``tests/security/test_broker_roles.py``). RabbitMQ checks
*configure* on declaring or deleting a queue or exchange, *write* on publishing to an exchange
(the default exchange is ``amq.default``) and on binding a queue, *read* on consuming, purging
and on the exchange side of a binding; a passive declare (whether a queue exists, its depth)
needs nothing. The management API also wants a user tag (the autoscaler's ``monitoring``).
The short-lived queues (the consumer's liveness and roll-call queues, the sender's
announcement queue) are named by the server (``amq.gen-*``, a name no client may declare) and
made again after each reconnect; they are exclusive, so only their own connection can use them.
Topic permissions on ``dispatch.control`` restrict routing keys: only senders roll-call and
cancel, only consumers announce.

What permissions cannot separate: publishing through the default exchange reaches any queue by
name, so the sender could publish into a reply queue and a consumer into a model queue. Reply
pieces are matched to pending calls by correlation id, and requests carry the sender's deadline:
a forged message needs knowledge a stolen broker password does not give, but the broker does not
stop it.
"""

from __future__ import annotations

from dataclasses import dataclass

from contract.names import CONTROL_EXCHANGE


@dataclass(frozen=True)
class BrokerRole:
    configure: str
    write: str
    read: str
    topic_write: str
    """Routing keys it may publish on the control exchange."""
    topic_read: str
    """Routing keys it may bind to on the control exchange."""
    tags: tuple[str, ...] = ()
    """User tags: what it may see of the management API (none: no management access at all)."""


SENDER = BrokerRole(
    # its reply queue dispatch.reply.<id>, the control exchange, its announcement queue, the configured
    # models' queues (SENDER_MODELS: declared before any consumer ran), the cancellation stream
    configure=r"^(dispatch\.reply\..+|dispatch\.control|amq\.gen-.+|dispatch\.model\..+|dispatch\.cancellations)$",
    # requests through the default exchange, roll calls and cancels, binding its announcement queue
    # and the cancellation stream
    write=r"^(amq\.default|dispatch\.control|amq\.gen-.+|dispatch\.cancellations)$",
    # its reply queue, announcements, the control exchange's side of a binding
    read=r"^(dispatch\.reply\..+|dispatch\.control|amq\.gen-.+)$",
    topic_write=r"^(rollcall|cancel)$",
    # announcements; cancel too, only to bind the cancellation stream (a binding is a topic read)
    topic_read=r"^(announce|cancel)$",
)

CONSUMER = BrokerRole(
    # its model queue, the dead-letter queue, the control exchange, its liveness and roll-call queues
    configure=r"^(dispatch\.model\..+|dispatch\.dead-letter|dispatch\.control|amq\.gen-.+)$",
    # replies and dead letters through the default exchange, announcements, binding its roll-call queue
    write=r"^(amq\.default|dispatch\.control|amq\.gen-.+)$",
    # its model queue, roll calls and cancels, the cancellations kept for it (read at start)
    read=r"^(dispatch\.model\..+|dispatch\.control|amq\.gen-.+|dispatch\.cancellations)$",
    topic_write=r"^announce$",
    topic_read=r"^(rollcall|cancel)$",
)

AUTOSCALER = BrokerRole(
    # KEDA's rabbitmq scaler with protocol http (the chart's default) reads a queue's counts, ready
    # plus unacknowledged, from the management API: GET /api/queues/<vhost>/<queue>. That takes the
    # monitoring tag *and* a permission entry on the vhost (without one: 401 "not authorised to access
    # virtual host"), whose patterns may all be empty: it then can neither take messages (POST .../get
    # needs read), publish, nor declare or delete anything. With protocol amqp a passive declare needs
    # no permission either (the tag is then not used).
    configure="^$",
    write="^$",
    read="^$",
    topic_write="^$",
    topic_read="^$",
    tags=("monitoring",),
)

ROLES = {"sender": SENDER, "consumer": CONSUMER, "autoscaler": AUTOSCALER}
TOPIC_EXCHANGE = CONTROL_EXCHANGE
