"""A check schemathesis runs beside its own (loaded through ``SCHEMATHESIS_HOOKS`` by test_openapi.py).

The description leaves the body of a forwarded call to the model's server,
beyond ``model``: its 400 for a body it cannot serve is relayed, so the test
lets positive data get a 400. This check keeps that leeway from hiding the
dispatcher's own mistakes: data the description allows never gets a 400 whose
code is one of the dispatcher's (the backend's codes are its HTTP status).
"""

from __future__ import annotations

from typing import Any

import schemathesis

from contract.errors import CATALOGUE


@schemathesis.check
def dispatcher_accepts_what_it_describes(ctx: Any, response: Any, case: Any) -> bool | None:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 400:
        return None
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return None  # not OpenAI-shaped: response_schema_conformance says so
    code = error.get("code") if isinstance(error, dict) else None
    if isinstance(code, str) and code in CATALOGUE:
        raise AssertionError(f"the dispatcher refused data its description allows: {code}: {error}")
    return None
