"""Stage configs from parsed command lines.

Every stage's config is a dataclass whose fields are its options' dests and whose defaults are the command line's
(the parser reads them from the dataclass), so a parsed namespace maps onto it field by field.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import TypeVar

C = TypeVar("C")


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """The `cls` config holding `args`' values of its fields (other attributes of `args` are ignored)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
