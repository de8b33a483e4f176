"""The README's walkthrough works when pasted in order on a fresh `make run`, and every
answer it shows is what the service answers (ignoring generated ids and times): the
README cannot drift from the service. See tests/readme_walkthrough.py for the rules, and
`python -m tests.readme_walkthrough --record` to rewrite the answers after a change."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import readme_walkthrough as walkthrough
from tests.readme_service import fresh_service

README = Path(__file__).resolve().parent.parent.parent / "README.md"


@pytest.fixture(scope="module")
def steps() -> list[walkthrough.Step]:
    return walkthrough.steps(README.read_text())


@pytest.fixture(scope="module")
def outputs(steps: list[walkthrough.Step], tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    workdir = tmp_path_factory.mktemp("fresh-clone")
    with fresh_service(workdir) as port:
        yield walkthrough.run(steps, workdir, port)


def test_the_walkthrough_shows_answers_and_no_date_that_goes_stale(steps: list[walkthrough.Step]) -> None:
    assert len(steps) >= 20
    assert sum(step.answer is not None for step in steps) >= 20
    for step in steps:
        # Times come from the service (a transfer's created_at), never from the page; the
        # one exception is history older than the service itself (an import of 2019's
        # transfers), which can only ever be in the past.
        dates = re.findall(r"(\d{4})-\d\d-\d\d", step.command)
        assert all(int(year) < 2020 for year in dates), f"README line {step.line}: a fixed date"
        assert step.answer is None or step.answer.strip(), f"README line {step.line}: an empty answer block"


def test_every_answer_is_what_the_service_answers(steps: list[walkthrough.Step], outputs: list[str]) -> None:
    problems = []
    for step, output in zip(steps, outputs, strict=True):
        if step.answer is None:
            continue
        why = walkthrough.mismatch(step, output)
        if why is not None:
            problems.append(f"README line {step.line}:\n{step.command}\n{why}")
    assert not problems, "\n\n".join(problems)


def test_the_comparison_has_teeth(steps: list[walkthrough.Step], outputs: list[str]) -> None:
    """A changed amount, code or header in an answer is a mismatch; a changed time is not."""
    answered = [(step, output) for step, output in zip(steps, outputs, strict=True) if step.answer]
    step, output = next((s, o) for s, o in answered if '"amount":25000' in o)
    assert walkthrough.mismatch(step, output.replace('"amount":25000', '"amount":25001')) is not None
    assert walkthrough.mismatch(step, re.sub(r"T\d\d:", "T00:", output)) is None
    step, output = next((s, o) for s, o in answered if "insufficient_funds" in o)
    assert walkthrough.mismatch(step, output.replace("insufficient_funds", "currency_mismatch")) is not None
    step, output = next((s, o) for s, o in answered if "idempotent-replayed: true" in o.lower())
    assert walkthrough.mismatch(step, re.sub("(?i)idempotent-replayed: true", "x: y", output)) is not None
