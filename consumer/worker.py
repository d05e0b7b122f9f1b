"""One consumer process: a model queue on one side, one vLLM server on the other.

Life cycle: wait for the backend to be healthy, read the names it serves
(``consumer/served_names.py``), listen for cancellations and read those
published before it started (``consumer/cancel_history.py``), declare a model
queue per name, then consume them all on one channel whose channel-wide
prefetch is the flow window (so only what vLLM can start at once leaves the
broker, whatever the name). Consumption pauses while the backend is unhealthy.
The worker owns what concerns all requests at once: the connection, the health, flow and announcement loops,
and cancellation. Each message is served by ``consumer/serving.py``, which
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
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
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
from consumer.status_server import serve_status
from contract import Announcement, Cancel, liveness
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
        self.names = ServedNames(settings.model, settings.max_priority)
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
        self._consume_channel: AbstractChannel | None = None
        self._reply_channel: AbstractChannel | None = None
        self._control: AbstractExchange | None = None
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
        return self.names.consuming

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
            asyncio.create_task(self._names_loop()),
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
        """Stop taking requests, let those in flight finish (within the grace period), say goodbye."""
        self._stopping = True
        await self._stop_consuming()
        await self._announce(Announcement.GONE)
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
        if self._connection is not None:
            await self._connection.close()
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
        self._connection = await aio_pika.connect_robust(
            self.settings.rabbitmq_url,
            ssl_context=self.settings.rabbitmq_ssl_context(),
            client_properties={"connection_name": f"consumer-{self.consumer_id}"},
            reconnect_interval=self.settings.reconnect_interval,
        )
        self._connection.close_callbacks.add(self._on_connection_lost)
        self._connection.reconnect_callbacks.add(self._on_reconnected)
        # Confirms, so that a reply piece that no queue took is known at once (consumer/replies.py).
        self._reply_channel = await self._connection.channel(publisher_confirms=True)
        self._serving = Serving(
            self.settings, self.backend, self.metrics, self._cancellations, self._reply_channel
        )
        await self._declare_liveness()
        await self._reply_channel.declare_queue(self.settings.dead_letter_queue, durable=True)
        self._control = await self._reply_channel.declare_exchange(
            contract.CONTROL_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        rollcall = await self._reply_channel.declare_queue(exclusive=True, auto_delete=True)
        await rollcall.bind(self._control, contract.ROLLCALL_KEY)
        await rollcall.bind(self._control, contract.CANCEL_KEY)
        await rollcall.consume(self._on_control, no_ack=True)
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
        await self.names.declare(self._connection, self._consume_channel)

    async def _declare_liveness(self) -> None:
        """A server-named exclusive queue: it lives exactly as long as this connection.

        Declared outside aio-pika's robust bookkeeping so that a reconnect makes
        a new name: pieces sent on the old connection then name a queue that is
        gone, and the sender knows their answer will not continue.
        """
        assert self._reply_channel is not None
        self._liveness_queue = await liveness.declare(await self._reply_channel.get_underlay_channel())

    def _on_connection_lost(self, *_: object) -> None:
        """The broker hands the unacked requests to another consumer: stop serving them here."""
        given_back = self._cancellations.delivery_lost()
        if given_back:
            log.warning("broker connection lost; %d requests in flight given back", given_back)

    async def _on_reconnected(self, *_: object) -> None:
        try:
            await self._declare_liveness()
        except BROKER_GONE as exc:
            log.warning("could not declare the liveness queue after reconnecting: %s", exc)

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
        # Channel-wide (global) prefetch changes take effect at once, unlike per-consumer ones.
        if size != self._applied_prefetch and self._consume_channel is not None:
            await self._consume_channel.set_qos(prefetch_count=size, global_=True)
            self._applied_prefetch = size

    async def _start_consuming(self) -> None:
        if not self.names.consuming and self._consume_channel is not None and not self._stopping:
            await self.names.start(self._on_message)
            await self._announce(Announcement.READY)

    async def _stop_consuming(self) -> None:
        if self.names.consuming:
            await self.names.stop()
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

    async def _on_control(self, message: AbstractIncomingMessage) -> None:
        if message.routing_key == contract.CANCEL_KEY:
            self._remember_cancel(Cancel.from_message(message))
        elif not self._stopping:
            await self._announce(Announcement.READY if self.consuming else Announcement.PAUSED)

    def _remember_cancel(self, cancel: Cancel) -> None:
        forget_in = _CANCEL_MEMORY if cancel.deadline is None else cancel.deadline - time.time()
        self._cancellations.client_gone(cancel.correlation_id, max(1.0, forget_in))

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
            )
            with contextlib.suppress(*BROKER_GONE):
                await self._control.publish(
                    announcement.message(),
                    routing_key=contract.ANNOUNCE_KEY,
                    mandatory=False,
                )

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        correlation_id = message.correlation_id or ""
        assert self._serving is not None
        if self._cancellations.skip(correlation_id):
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
                await self._act_on(served)
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
