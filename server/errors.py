"""The one exception the serving layer raises for a request it refuses; the app turns it
into OpenAI's error object (`protocol.ErrorResponse`) with the status and headers."""

from __future__ import annotations

from . import protocol as P


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return P.ErrorResponse(error=P.ErrorDetail(message=self.message, type=self.type, param=self.param,
                                                   code=self.code)).model_dump()
