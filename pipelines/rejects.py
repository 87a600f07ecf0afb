"""The bad-input policy's vocabulary: a row that cannot be featurized becomes a reject, never a crash."""
from __future__ import annotations

import dataclasses


class RejectError(Exception):
    """Raised by a pure stage function for input it must refuse; the DoFn turns it into a reject row.

    `reason` is a short stable code (downstream dashboards group by it); `detail` is for humans.
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class Reject:
    source: str
    stage: str
    reason: str
    detail: str
    row: int | None = None
    image_id: str | None = None
    product_id: str | None = None

    def as_row(self) -> dict:
        return dataclasses.asdict(self)
