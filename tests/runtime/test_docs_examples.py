"""The example test in docs/lifecycle.md runs as written, so it cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "lifecycle.md"


@pytest.mark.asyncio
async def test_fake_cluster_example_in_docs_passes() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "docs/lifecycle.md lost its example"
    namespace: dict[str, object] = {}
    exec(compile(blocks[-1], str(DOC), "exec"), namespace)
    await namespace["test_slow_rank"]()  # type: ignore[operator]
