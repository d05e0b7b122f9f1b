"""Accounting: what a forwarded call leaves behind once its answer is sent, in one place.

Every call gets its metrics and one ``request`` log line. A call that reached
a model queue also settles its tokens-per-minute reservation with the tokens
it really used and leaves a usage row (buffered, written off the request
path), once its usage is known: at once for a complete answer; for one cut
short (client gone, deadline, interruption) when the consumer's report of the
tokens generated up to the cut arrives, or after a bounded wait
(``sender/calls.py``). A request admitted but never queued gives its
reservation back.
"""

from __future__ import annotations

import logging
import time

from contract import errors
from contract.errors import clip
from sender.admission import AdmittedRequest
from sender.calls import PendingCall
from sender.limits import RateLimiter
from sender.metrics import SenderMetrics
from sender.usage_rows import UsageRecorder

# The request line keeps the logger name it always had: log pipelines select on it.
log = logging.getLogger("sender.app")


class Accounting:
    def __init__(
        self,
        metrics: SenderMetrics,
        limiter: RateLimiter,
        usage: UsageRecorder,
        *,
        usage_rows: bool,
    ) -> None:
        self._metrics = metrics
        self._limiter = limiter
        self._usage = usage
        self._usage_rows = usage_rows

    def finished(
        self,
        *,
        request_id: str,
        path: str,
        status: int,
        code: str | None,
        started: float,
        first_piece_at: float | None,
        request: AdmittedRequest | None,
        call: PendingCall | None,
    ) -> None:
        """Account for a call whose answer went out: ``code`` is the error the sender answered
        itself, ``request`` what was read of it, ``call`` where it was queued (None: neither)."""
        seconds = time.perf_counter() - started
        metrics = self._metrics
        if code is not None:
            metrics.rejected.labels(errors.reason_of(code)).inc()
        if request is not None:
            metrics.answered(request.model, request.token.name, status, request.priority, seconds)
            if first_piece_at is not None and code is None:
                metrics.first_piece(request.model, request.priority, first_piece_at - started)
        if log.isEnabledFor(logging.INFO):
            fields: dict[str, object] = {}
            if request is not None:
                fields.update(
                    token=request.token.name,
                    model=clip(request.model),
                    priority=request.priority,
                    stream=request.stream,
                )
            fields.update(
                request_id=request_id, path=clip(path), status=status, code=code, ms=round(seconds * 1000, 1)
            )
            log.info("request", extra={"fields": fields})
        if request is not None and call is None:
            self._limiter.settle(request.token, request.reservation, 0, 0)
        elif call is not None and request is not None:
            total_ms = round(seconds * 1000)
            call.when_settled(lambda: self._usage_row(request, call, status, total_ms))

    def _usage_row(self, request: AdmittedRequest, call: PendingCall, status: int, total_ms: int) -> None:
        final = call.final
        prompt = final.prompt_tokens if final is not None else None
        completion = final.completion_tokens if final is not None else None
        if completion is None:
            completion = call.events  # no report (the consumer died, or is too old to report a cut)
        prompt = prompt or 0
        self._limiter.settle(request.token, request.reservation, prompt, completion)
        if not self._usage_rows:
            return
        self._usage.record(
            {
                "token_id": request.token.id or None,
                "token_name": request.token.name,
                "model": request.model,
                "path": request.path[:255],
                "request_id": request.request_id,
                "status": status,
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "queue_ms": final.queue_ms if final is not None else None,
                "total_ms": total_ms,
                "priority": request.priority,
                "streamed": request.stream,
            }
        )
