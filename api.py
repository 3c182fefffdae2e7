"""The JSON API's request checking, shared by the server and the tasks that answer its requests: one error type
that carries the HTTP status, and `field`, which reads one typed, range-checked value from a request body."""
from __future__ import annotations

import math
from http import HTTPStatus


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def field(req: dict, name: str, kind: type, default=None, lo=None, hi=None, allow_empty: bool = False):
    """req[name] as `kind` within [lo, hi]; missing -> default (required when default is None)."""
    value = req.get(name, default)
    if value is None:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"missing field {name!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):  # True is an int too
        raise ApiError(HTTPStatus.BAD_REQUEST, f"field {name!r} must be a {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value):  # json.loads refuses NaN already; a caller's dict may not
        raise ApiError(HTTPStatus.BAD_REQUEST, f"field {name!r} must be a finite number, got {value!r}")
    if kind is str and not allow_empty and not value.strip():
        raise ApiError(HTTPStatus.BAD_REQUEST, f"field {name!r} is empty")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ApiError(HTTPStatus.BAD_REQUEST, f"field {name!r}={value} is outside [{lo}, {hi}]")
    return value
