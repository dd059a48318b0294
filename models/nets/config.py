"""The dict round trip of the networks' frozen dataclass configs (a catalog entry's `network`
section and checkpoints store them as JSON, where tuples come back as lists)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, ClassVar, Self


class NetConfig:
    """Mixin of a frozen dataclass config: `from_dict` turns the JSON lists of `TUPLE_FIELDS` back
    into the tuples the dataclass declares (so configs compare and hash alike); `to_dict` inverts."""

    TUPLE_FIELDS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        data = dict(data)
        for key in cls.TUPLE_FIELDS:
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]  # every subclass is a dataclass
