"""The JSON codec of streamcdp: thin orjson wrappers, so every module encodes alike.

>>> dumps({"a": 1, "b": [True, None]})
b'{"a":1,"b":[true,null]}'
>>> loads(b'{"a":1}')
{'a': 1}

``dumps`` returns compact UTF-8 ``bytes`` (what Kafka and Redis want) and
serialises dataclasses such as :class:`schemas.events.Identifier` natively;
``loads`` accepts ``bytes``, ``bytearray``, ``memoryview`` or ``str`` and raises
:data:`JSONDecodeError` (a ``ValueError``) on bad input.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["dumps", "loads", "JSONDecodeError"]

JSONDecodeError = orjson.JSONDecodeError


def dumps(obj: Any) -> bytes:
    """Serialise ``obj`` to compact JSON bytes."""
    return orjson.dumps(obj)


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Parse JSON bytes (or str) into Python objects."""
    return orjson.loads(data)
