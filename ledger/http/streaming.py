"""A streamed response with a total time budget, for statement exports.

A client that reads a statement slowly, or not at all, would otherwise keep its request
(and the memory of a page) forever. Past the budget the response is cut: the connection
is closed without the final chunk, so the client sees an incomplete response, never a
statement that looks complete. When the server offers `ledger.abort`
(`ledger.http.protocol`), the cut is a clean close; otherwise the error propagates and the
server closes the connection itself.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from litestar.response import Stream
from litestar.response.streaming import ASGIStreamingResponse

from ledger.http.protocol import ABORT_EXTENSION

logger = logging.getLogger("ledger.http")


class ExportCut(Exception):
    """A streamed export ran past its budget, or its source failed, mid-response."""


class BudgetedStream(Stream):
    """A stream that keeps its own media type (Litestar otherwise applies the handler's,
    JSON for the entries endpoint) and is cut after `budget_seconds`."""

    def __init__(self, *args: Any, budget_seconds: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.budget_seconds = budget_seconds

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["media_type"] = self.media_type
        return _Budgeted(super().to_asgi_response(*args, **kwargs), self.budget_seconds)


class _Budgeted:
    def __init__(self, response: ASGIStreamingResponse, budget_seconds: float) -> None:
        self._response = response
        self._budget_seconds = budget_seconds

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            async with asyncio.timeout(self._budget_seconds):
                await self._response(scope, receive, send)
        except TimeoutError:
            reason = f"the export ran past its {self._budget_seconds} s budget (LEDGER_EXPORT_TIMEOUT_SECONDS)"
        except BaseException as error:
            # The stream runs in a task group, which wraps what its task raised.
            cut = error.subgroup(ExportCut) if isinstance(error, BaseExceptionGroup) else error
            if not isinstance(cut, ExportCut | BaseExceptionGroup):
                raise
            reason = str(cut.exceptions[0] if isinstance(cut, BaseExceptionGroup) else cut)
        else:
            return
        logger.warning("statement export cut: %s", reason)
        abort = scope.get("extensions", {}).get(ABORT_EXTENSION)
        if abort is None:
            raise ExportCut(reason)
        abort()
