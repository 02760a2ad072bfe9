"""The base of every payload model: frozen, and strict about unknown fields."""

from pydantic import BaseModel, ConfigDict


class Payload(BaseModel):
    """A message payload. Unknown fields are refused so typos fail loudly."""

    model_config = ConfigDict(frozen=True, extra="forbid")
