"""Where the tests find the team's shared folder (beside the project root; absent on some machines)."""

from __future__ import annotations

from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
SHARED = PROJECT.parent / "shared"
SHARED_DATA = SHARED / "data"
SHARED_REFERENCE = SHARED / "reference"
