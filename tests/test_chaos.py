"""The chaos run in CI: 500 prompts while nodes, the hub and the broker are killed.

The same scenario in full (faults spread over a longer run) is ``make chaos``; see tests/chaos.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .chaos import run_chaos


@pytest.mark.timeout(400)
async def test_no_prompt_is_lost_and_none_is_answered_twice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tally = await run_chaos(tmp_path, prompts=500, clients=4, duration=60.0, out=lambda _line: None)
    with capsys.disabled():
        print("\n" + tally.report())
    assert len(tally.events) == 14, "every fault in the script must have happened during the run"
    assert tally.lost == 0, tally.report()
    assert tally.conflicting == 0, tally.report()
    assert tally.answered + tally.errored == tally.sent
    # The faults cost time, not answers: with five nodes, explicit errors stay rare.
    assert tally.answered >= 0.95 * tally.sent, tally.report()
    # Both runs of the hub read the journal (what the killed one left depends on timing).
    assert (tmp_path / "hub.log").read_text().count("journal loaded") == 2
