"""Accounting: what a forwarded call leaves behind once its answer is sent, in one place.

Every call gets its metrics and one ``request`` log line. A call that reached
a model queue also counts its tokens against the token's tokens-per-minute
limit and leaves a usage row (buffered, written off the request path).
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
        if call is not None and request is not None:
            self._usage_row(request, call, status, started)

    def _usage_row(self, request: AdmittedRequest, call: PendingCall, status: int, started: float) -> None:
        final = call.final
        prompt = (final.prompt_tokens or 0) if final is not None else 0
        completion = (final.completion_tokens or 0) if final is not None else 0
        self._limiter.spent(request.token, prompt + completion)
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
                "total_ms": round((time.perf_counter() - started) * 1000),
                "priority": request.priority,
                "streamed": request.stream,
            }
        )
