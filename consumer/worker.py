"""One consumer process: a model queue on one side, one vLLM server on the other.

Life cycle: wait for the backend to be healthy, read the names it serves
(``consumer/served_names.py``), listen for cancellations and read those
published before it started (``consumer/cancel_history.py``), declare a model
queue per name (quorum or classic, :mod:`contract.queues`), then consume
through as many prefetch-one consumers as the flow window allows
(:mod:`consumer.slots`), shared out among the names, so only what vLLM can
start at once leaves the broker, whatever the name. Consumption pauses while
the backend is unhealthy.

The worker alone re-subscribes: after the consume channel reopens (a
reconnect) and when the broker cancels a consumer (its quorum queue failed
over, or was deleted), one subscription task redeclares the queues this
process owns on whichever node it is connected to and makes the slots again.
A consume channel that closes gives back every request it delivered: their
serving stops at once (the broker hands them to another consumer). The
worker owns what concerns all requests at once: the two broker connections
(consuming: the model queue, control messages, the liveness queue; publishing:
replies, announcements), the health, flow and announcement loops, and
cancellation. Each message is served by ``consumer/serving.py``, which
says what became of it; the worker acts on that (an unreachable backend
pauses consumption).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Coroutine
from typing import Any

import aio_pika
import aiohttp
import aiormq
import aiormq.abc
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aiohttp import web

import contract
from consumer import cancel_history
from consumer.backend import Backend, Health
from consumer.cancellation import Cancellations
from consumer.flow import Window
from consumer.metrics import ConsumerMetrics
from consumer.served_names import ServedNames, cards_from
from consumer.serving import Outcome, Served, Serving
from consumer.settings import ConsumerSettings
from consumer.slots import Slots
from consumer.status_server import serve_status
from contract import Announcement, Cancel, broker_connection, liveness, queues
from contract.errors import BROKER_GONE

log = logging.getLogger(__name__)

_CANCEL_MEMORY = 900.0
"""Seconds a cancellation without a deadline is remembered for a request not seen yet."""
_CUT_SECONDS = 5.0
"""Seconds the answers cut at shutdown get to send their last piece."""


class Worker:
    def __init__(self, settings: ConsumerSettings) -> None:
        self.settings = settings
        self.consumer_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.backend = Backend(
            settings.vllm_url, max_connections=settings.max_inflight + 4, api_key=settings.backend_api_key()
        )
        self.window = Window(
            maximum=settings.max_inflight,
            initial=settings.initial_window,
            waiting_tolerance=settings.waiting_tolerance,
            kv_cache_max=settings.kv_cache_max,
        )
        self.metrics = ConsumerMetrics(settings.model)
        self.metrics.watch(
            in_flight=lambda: self.inflight,
            window=lambda: self._applied_prefetch,
            healthy=lambda: 1.0 if self._healthy.is_set() else 0.0,
            consuming=lambda: 1.0 if self.consuming else 0.0,
        )
        self._status: web.AppRunner | None = None
        self.inflight = 0
        self._connection: AbstractRobustConnection | None = None
        """The consuming connection (model queue, control messages, liveness queue)."""
        self._publishing: AbstractRobustConnection | None = None
        """The publishing connection (replies, announcements, dead letters)."""
        self._control_channel: AbstractChannel | None = None
        self._background: set[asyncio.Future[None]] = set()
        self._consume_channel: AbstractRobustChannel | None = None
        self._reply_channel: AbstractChannel | None = None
        self._control: AbstractExchange | None = None
        self.queue_type = queues.QueueType.CLASSIC
        """Type of the queues this consumer declares, chosen when it connects."""
        self.names = ServedNames(
            settings.model, settings.max_priority, self._on_delivery, self._want_subscription
        )
        self._balance = asyncio.Event()
        """Set when the window's slots may have to move between names (one was released)."""
        self._consuming = False
        """Whether the model queue should be consumed now (the backend is healthy, not stopping)."""
        self._subscribe = asyncio.Event()
        """Set when the slots must be made again: the channel reopened, or the broker cancelled one."""
        self._serving_tasks: set[asyncio.Task[None]] = set()
        self._applied_prefetch = 0
        self._healthy = asyncio.Event()
        self._slow_checks = 0
        """Health checks in a row that got no answer in time."""
        self._check_now = asyncio.Event()
        self._idle = asyncio.Event()
        self._window_pressed = asyncio.Event()
        """Set when a new request brings the flow window close to binding."""
        self._idle.set()
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._cancellations = Cancellations()
        self._serving: Serving | None = None
        self._liveness_queue = ""
        """This connection's liveness queue (see the contract); a new one after each reconnect."""

    @property
    def consuming(self) -> bool:
        return self._consuming

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then drain gracefully."""
        if self.settings.status_port:
            self._status = await serve_status(
                self.metrics,
                lambda: self.consuming,
                self.settings.status_host,
                self.settings.status_port,
                backend_metrics=lambda: self.backend.metrics_exposition(
                    max_bytes=self.settings.backend_metrics_max_bytes,
                    timeout=self.settings.backend_metrics_timeout,
                ),
            )
        await self._wait_for_backend(stop)
        if stop.is_set():
            await self.backend.close()
            if self._status is not None:
                await self._status.cleanup()
            return
        await self._connect()
        use_metrics = await self._choose_flow()
        await self._apply_prefetch(self.window.size if use_metrics else self.settings.max_inflight)
        await self._start_consuming()
        self._tasks = [
            asyncio.create_task(self._health_loop()),
            asyncio.create_task(self._announce_loop()),
            asyncio.create_task(self._subscription_loop()),
            asyncio.create_task(self._names_loop()),
            asyncio.create_task(self._balance_loop()),
        ]
        if use_metrics:
            self._tasks.append(asyncio.create_task(self._flow_loop()))
        log.info(
            "consumer %s serving model %s from %s",
            self.consumer_id,
            self.settings.model,
            self.settings.vllm_url,
        )
        await stop.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop taking requests, let those in flight finish (within the grace period), say goodbye.

        Every step that needs the broker is bounded: with the broker gone, aio-pika would wait for it
        to come back, and the process would outlive its SIGTERM."""
        self._stopping = True
        await _bounded(self._stop_consuming(), "stopping consumption")
        await _bounded(self._announce(Announcement.GONE), "saying goodbye")
        try:
            await asyncio.wait_for(self._idle.wait(), self.settings.shutdown_grace)
        except TimeoutError:
            log.warning("%d requests still in flight after the grace period", self.inflight)
            # Each answer cut here ends with an error and the tokens it generated, then is acked.
            self._cancellations.shutting_down()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), _CUT_SECONDS)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for connection in (self._connection, self._publishing):
            if connection is not None:
                await _bounded(connection.close(), "closing a broker connection")
        await self.backend.close()
        if self._status is not None:
            await self._status.cleanup()

    async def _wait_for_backend(self, stop: asyncio.Event) -> None:
        started = time.monotonic()
        while not stop.is_set():
            if await self.backend.health(self.settings.health_timeout) is Health.UP:
                try:
                    await self.names.follow(await self._backend_cards())
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    log.warning("backend healthy but /v1/models failed: %s", exc)
                else:
                    self._healthy.set()
                    return
            timeout = self.settings.startup_timeout
            if timeout and time.monotonic() - started > timeout:
                raise RuntimeError(f"backend {self.settings.vllm_url} not healthy after {timeout} s")
            log.info("waiting for backend %s", self.settings.vllm_url)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    async def _connect(self) -> None:
        """Two connections: one consumes (the model queue, control messages; the liveness queue lives
        with it), one publishes (replies, announcements). A memory or disk alarm blocks the
        publishing one; the consuming one still acks, so the queue drains as requests finish."""
        self._connection = await self._open_connection("consume")
        self._publishing = await self._open_connection("publish")
        self._connection.close_callbacks.add(self._on_connection_lost)
        self._connection.reconnect_callbacks.add(self._on_reconnected)
        self._publishing.close_callbacks.add(self._on_publishing_lost)
        self._publishing.reconnect_callbacks.add(self._on_publishing_back)
        # Confirms, so that a reply piece that no queue took is known at once (consumer/replies.py).
        self._reply_channel = await self._publishing.channel(publisher_confirms=True)
        self._serving = Serving(
            self.settings, self.backend, self.metrics, self._cancellations, self._reply_channel
        )
        self._control_channel = await self._connection.channel(publisher_confirms=False)
        await self._declare_liveness()
        transport = self._connection.transport
        assert transport is not None
        version = queues.server_version(transport.connection)
        self.queue_type = queues.choose(self.settings.queue_type, version, self.settings.max_priority)
        self.names.queue_type, self.names.fixed_type = self.queue_type, self.settings.queue_type != "auto"
        model_queue = contract.model_queue(self.settings.model)
        log.info("model queue %s is a %s queue", model_queue, self.queue_type.value)
        await self._declare_owned()
        self._control = await self._reply_channel.declare_exchange(
            contract.CONTROL_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        await self._listen_control()
        # Cancellations published before this start (a model woken from zero): read before serving.
        started = time.monotonic()
        caught = await cancel_history.catch_up(
            self._connection, self._remember_cancel, timeout=self.settings.cancel_catch_up_seconds
        )
        if caught is not None:
            log.info(
                "cancellation stream read in %.0f ms: %d requests cancelled before this start to skip",
                (time.monotonic() - started) * 1000,
                caught,
            )

        self._consume_channel = await self._connection.channel(publisher_confirms=False)
        await self._attach(await self._consume_channel.get_underlay_channel())
        self._consume_channel.reopen_callbacks.add(lambda *_: self._want_subscription())

    async def _open_connection(self, role: str) -> AbstractRobustConnection:
        return await broker_connection.connect(
            self.settings.rabbitmq_urls,
            name=f"consumer-{self.consumer_id}-{role}",
            reconnect_interval=self.settings.reconnect_interval,
            ssl_context=self.settings.rabbitmq_ssl_context(),
        )

    async def _declare_owned(self) -> None:
        """Declare every served name's model queue and the dead-letter queue (again after a reconnect
        or a failover)."""
        assert self._connection is not None and self._connection.transport is not None
        connection = self._connection.transport.connection
        await self.names.declare(connection)
        self.queue_type = self.names.queue_type
        await queues.declare(
            connection,
            self.settings.dead_letter_queue,
            {kind: queues.dead_letter_queue_arguments(kind) for kind in queues.QueueType},
            self.queue_type,
            fixed=False,
        )

    async def _attach(self, channel: aiormq.abc.AbstractChannel) -> None:
        """Consume on ``channel`` from now on; when it closes, what it delivered is given back."""
        channel.closing.add_done_callback(lambda _: self._on_delivery_lost())
        await self.names.attach(channel)

    async def _declare_liveness(self) -> None:
        """A server-named exclusive queue: it lives exactly as long as the consuming connection,
        which holds the deliveries (when it drops, the broker hands them to another consumer).

        Declared outside aio-pika's robust bookkeeping so that a reconnect makes
        a new name: pieces sent on the old connection then name a queue that is
        gone, and the sender knows their answer will not continue.
        """
        assert self._control_channel is not None
        self._liveness_queue = await liveness.declare(await self._control_channel.get_underlay_channel())

    def _on_publishing_lost(self, *_: object) -> None:
        """Replies cannot be sent until the publishing connection is back: pause (see
        :meth:`_pause_for_replies`)."""
        if not self._stopping:
            task = asyncio.ensure_future(self._pause_for_replies())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _pause_for_replies(self) -> None:
        """Stop taking requests, and give those in flight back by dropping the consuming connection
        too (the robust connection makes a new one at once): their replies may have been lost, and
        the liveness queue going with it lets the senders end those answers now rather than at the
        deadline. Consuming resumes once the publishing connection is back."""
        log.warning("broker connection for replies lost; pausing and giving the requests in flight back")
        consuming = self._connection
        if consuming is not None and consuming.transport is not None:
            # First: a piece waiting for the reply channel to reopen must never go out after one lost.
            await _drop(consuming.transport.connection)
        await self._stop_consuming()

    async def _on_publishing_back(self, *_: object) -> None:
        if self._healthy.is_set():
            await _survive(self._start_consuming(), "resuming after the reply connection came back")

    @property
    def _can_reply(self) -> bool:
        publishing = self._publishing
        return publishing is not None and publishing.connected.is_set() and not publishing.is_closed

    def _on_connection_lost(self, *_: object) -> None:
        self._on_delivery_lost()

    def _on_delivery_lost(self) -> None:
        """The broker hands the unacked requests to another consumer: stop serving them here."""
        given_back = self._cancellations.delivery_lost()
        if given_back:
            log.warning("broker channel lost; %d requests in flight given back", given_back)

    def _want_subscription(self) -> None:
        self._subscribe.set()

    async def _subscription_loop(self) -> None:
        """The one owner of re-subscribing: redeclare what this consumer owns, then make its slots again."""
        while True:
            await self._subscribe.wait()
            self._subscribe.clear()
            try:
                await self._resubscribe()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling() > 0:
                    raise
                log.warning("subscribing again interrupted: the broker connection dropped")
            except Exception as exc:
                log.warning("could not subscribe again (%s); trying again", exc)
            else:
                continue
            await asyncio.sleep(self.settings.reconnect_interval)
            self._subscribe.set()

    async def _resubscribe(self) -> None:
        assert self._consume_channel is not None
        channel = await self._consume_channel.get_underlay_channel()
        await self._declare_owned()
        if channel is not self.names.channel:
            await self._attach(channel)
        await self._distribute()

    async def _distribute(self) -> None:
        """Share the flow window out among the names' slots (nothing while not consuming)."""
        await self.names.distribute(
            self._applied_prefetch if self._consuming else 0,
            depths_every=self.settings.names_balance_interval,
        )

    async def _balance_loop(self) -> None:
        """Move the window's slots to the names whose requests wait, while several names share it: after
        each release, and every ``names_balance_interval`` (a request may wait for an idle name)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._balance.wait(), self.settings.names_balance_interval)
            self._balance.clear()
            if self._consuming and self.names.sharing:
                await _survive(self._distribute(), "sharing the window among the names")

    async def _listen_control(self) -> None:
        """Roll calls and cancellations, through a queue of the consuming connection (see
        ``liveness.listen``)."""
        assert self._control_channel is not None
        await liveness.listen(
            await self._control_channel.get_underlay_channel(),
            contract.CONTROL_EXCHANGE,
            (contract.ROLLCALL_KEY, contract.CANCEL_KEY),
            self._on_control_delivery,
        )

    async def _on_control_delivery(self, delivered: aiormq.abc.DeliveredMessage) -> None:
        await self._on_control(aio_pika.IncomingMessage(delivered, no_ack=True))

    async def _on_reconnected(self, *_: object) -> None:
        try:
            await self._declare_liveness()
            await self._listen_control()
        except BROKER_GONE as exc:
            log.warning("could not declare the liveness and control queues after reconnecting: %s", exc)

    async def _choose_flow(self) -> bool:
        if self.settings.flow == "fixed":
            return False
        load = await self.backend.load()
        if load is None:
            if self.settings.flow == "metrics":
                log.warning(
                    "backend exports no vLLM metrics; using a fixed window of %d", self.settings.max_inflight
                )
            return False
        return True

    async def _apply_prefetch(self, size: int) -> None:
        """Make the flow window ``size``: that many slots while consuming (see :mod:`consumer.slots`)."""
        if size != self._applied_prefetch:
            self._applied_prefetch = size
            if self._consuming:
                await self._distribute()

    async def _start_consuming(self) -> None:
        if not self._consuming and not self._stopping:
            self._consuming = True
            try:
                await self._distribute()
            except BROKER_GONE:
                self._want_subscription()  # made once the channel is back
            await self._announce(Announcement.READY)

    async def _stop_consuming(self) -> None:
        if self._consuming:
            self._consuming = False
            with contextlib.suppress(*BROKER_GONE):
                await self._distribute()
            await self._announce(Announcement.PAUSED)

    async def _health_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._check_now.wait(), self.settings.health_interval)
            self._check_now.clear()
            await _survive(self._health_step(), "health check")

    async def _health_step(self) -> None:
        health = await self.backend.health(self.settings.health_timeout)
        self._slow_checks = self._slow_checks + 1 if health is Health.SLOW else 0
        if 0 < self._slow_checks < self.settings.health_slow_checks:
            return  # maybe only busy: keep the current state until it answers or stays silent
        if health is Health.UP:
            if not self._healthy.is_set():
                log.info("backend is back; consuming again")
                self._healthy.set()
            if self._can_reply:
                await self._start_consuming()
        else:
            if self._healthy.is_set():
                log.warning("backend %s is unhealthy; pausing consumption", self.settings.vllm_url)
                self._healthy.clear()
            await self._stop_consuming()

    async def _flow_loop(self) -> None:
        # Reading /metrics costs CPU on both sides, and so does every wake-up of a quiet
        # process: the backend is read every metrics_interval only while the window is
        # close to binding, once a second while lightly loaded, and never while idle.
        last_read = 0.0
        while True:
            await asyncio.sleep(self.settings.metrics_interval)
            if self.inflight * 2 < self.window.size:
                self._window_pressed.clear()
                now = time.monotonic()
                quiet = 1.0 if self.inflight == 0 else max(0.0, last_read + 1.0 - now)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._window_pressed.wait(), quiet)
            if self.inflight == 0:
                continue  # nothing to learn from an idle backend
            last_read = time.monotonic()
            load = await self.backend.load()
            if load is not None:
                await _survive(self._apply_prefetch(self.window.update(load, self.inflight)), "flow window")

    async def _announce_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.announce_interval)
            await _survive(
                self._announce(Announcement.READY if self.consuming else Announcement.PAUSED), "announcement"
            )

    async def _on_control(self, message: AbstractIncomingMessage) -> None:
        if message.routing_key == contract.CANCEL_KEY:
            self._remember_cancel(Cancel.from_message(message))
        elif not self._stopping:
            await self._announce(Announcement.READY if self.consuming else Announcement.PAUSED)

    def _remember_cancel(self, cancel: Cancel) -> None:
        forget_in = _CANCEL_MEMORY if cancel.deadline is None else cancel.deadline - time.time()
        self._cancellations.client_gone(cancel.correlation_id, max(1.0, forget_in))

    async def _backend_cards(self) -> dict[str, dict[str, Any]]:
        return cards_from(
            await self.backend.models(), self.settings.model, discover=self.settings.discover_names
        )

    async def _names_loop(self) -> None:
        """Follow the adapters loaded and unloaded at run time (and aliases of a restarted backend)."""
        while True:
            await asyncio.sleep(self.settings.names_interval)
            await _survive(self._names_step(), "served names")

    async def _names_step(self) -> None:
        try:
            cards = await self._backend_cards()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.info("could not read the backend's served names: %s", exc)
            return
        state = Announcement.READY if self.consuming else Announcement.PAUSED
        added, removed = await self.names.follow(cards)
        for name in removed:
            log.info("backend no longer serves %s: stopped taking its requests", name)
            await self._announce(Announcement.GONE, only=name)
        for name in added:
            log.info("backend now serves %s too: taking its requests", name)
            await self._announce(state, only=name)

    async def _announce(self, state: str, only: str | None = None) -> None:
        """Tell the senders ``state`` for every served name (one announcement each), or ``only`` one."""
        if self._control is None:
            return
        for name in [only] if only is not None else list(self.names.cards):
            announcement = Announcement(
                consumer_id=self.consumer_id,
                model=name,
                state=state,
                ttl=self.settings.announce_interval * 3,
                card=dict(self.names.cards.get(name, {"id": name})),
                max_priority=contract.wire_max_priority(self.settings.max_priority),
                shared=len(self.names.cards) > 1,
            )
            with contextlib.suppress(*BROKER_GONE):
                await self._control.publish(
                    announcement.message(),
                    routing_key=contract.ANNOUNCE_KEY,
                    mandatory=False,
                )

    def _on_delivery(self, slots: Slots, delivered: aiormq.abc.DeliveredMessage) -> None:
        """Serve each delivery in a task of its own: only the worker stops it (client gone, delivery lost)."""
        task = asyncio.create_task(self._on_message(slots, delivered))
        self._serving_tasks.add(task)
        task.add_done_callback(self._serving_tasks.discard)

    async def _release(self, slots: Slots, delivered: aiormq.abc.DeliveredMessage) -> None:
        await slots.release(delivered)
        if self.names.sharing:
            self._balance.set()

    async def _on_message(self, slots: Slots, delivered: aiormq.abc.DeliveredMessage) -> None:
        message = aio_pika.IncomingMessage(delivered, no_ack=False)
        correlation_id = message.correlation_id or ""
        assert self._serving is not None
        if not self._can_reply:
            return  # left unacked: dropping the consuming connection gives it back (_pause_for_replies)
        if self._cancellations.skip(correlation_id):
            await _survive(self._release(slots, delivered), "releasing a slot")
            await self._serving.skip(message, liveness_queue=self._liveness_queue)
            return
        self.inflight += 1
        self._idle.clear()
        if self.inflight * 2 >= self.window.size:
            self._window_pressed.set()
        task = asyncio.current_task()
        if correlation_id and task is not None:
            self._cancellations.track(correlation_id, task)
        try:
            async with self._serving.serve(message, liveness_queue=self._liveness_queue) as served:
                try:
                    await self._act_on(served)
                finally:
                    # Before the message is settled: a window that shrank must not get it refilled.
                    await _survive(self._release(slots, delivered), "releasing a slot")
        finally:
            self._cancellations.untrack(correlation_id)
            self.inflight -= 1
            if self.inflight == 0:
                self._idle.set()

    async def _act_on(self, served: Served) -> None:
        """A backend that failed is checked at once; one that could not be reached pauses consumption,
        before the request goes back to the queue for another replica."""
        if served.trouble is None:
            return
        self._check_now.set()
        if served.outcome is Outcome.REQUEUED:
            self._healthy.clear()
            await self._stop_consuming()


async def _survive(step: Coroutine[Any, Any, None], what: str) -> None:
    """Run one step of a background loop so that no failure ends the loop.

    aiormq cancels the calls under way when its connection drops; the
    ``CancelledError`` that reaches the loop then is not a request to stop.
    """
    try:
        await step
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling() > 0:
            raise
        log.warning("%s interrupted: the broker connection dropped", what)
    except Exception:
        log.exception("%s failed; trying again later", what)


async def _bounded(step: Coroutine[Any, Any, None], what: str, seconds: float = 5.0) -> None:
    """A broker step of the shutdown, given up after ``seconds`` (the broker may be gone)."""
    try:
        await asyncio.wait_for(step, seconds)
    except TimeoutError:
        log.warning("%s: the broker did not answer within %g s; going on", what, seconds)
    except BROKER_GONE:
        pass


async def _drop(connection: aiormq.abc.AbstractConnection) -> None:
    """Close an AMQP connection under its robust owner, which then reconnects."""
    with contextlib.suppress(*BROKER_GONE):
        await connection.close(ConnectionError("the reply connection was lost"))
