"""The python examples in docs/integrations/ run as written (in order, one namespace per page)."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DOCS = Path(__file__).resolve().parents[2] / "docs" / "integrations"
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
PAGES = ["huggingface.md", "accelerate.md", "lightning.md", "compile.md", "checkpoint.md", "peft.md"]


def test_every_page_is_listed():
    assert sorted(p.name for p in DOCS.glob("*.md")) == sorted(PAGES)


@pytest.mark.parametrize("page", PAGES)
def test_examples_run(page: str) -> None:
    blocks = FENCE.findall((DOCS / page).read_text())
    assert blocks, f"{page} has no python examples"
    namespace: dict = {"__name__": f"docs_integrations_{page}"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, block in enumerate(blocks):
            try:
                exec(compile(block, f"{page}[block {i}]", "exec"), namespace)
            except Exception as exc:  # pragma: no cover - the message is the point
                raise AssertionError(f"{page}, example {i} failed: {exc!r}\n{block}") from exc
    if page == "accelerate.md":
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
