"""The README's walkthrough as a program: its shell blocks, in order, and the answers shown
after them.

The walkthrough is the part of README.md between `<!-- walkthrough -->` and
`<!-- /walkthrough -->`. Every ```sh block there runs, in order, in one bash session (so
variables set by one block are seen by the next), from a directory where `make run` would
have been run. A block followed directly by a ```json, ```http or ```text block must print
that answer. Answers are compared after normalising what differs on every run: times,
hashes, generated ids and keys. In an expected JSON answer the string "..." matches any
value, so a long field can be elided.

`python -m tests.readme_walkthrough --record` starts a fresh service, runs the walkthrough
and writes the answers it got into README.md (then read the diff!).
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

START = "<!-- walkthrough -->"
END = "<!-- /walkthrough -->"
ANSWER_LANGUAGES = ("json", "http", "text")
FENCE = re.compile(r"^```([a-z]*)\n(.*?)^```\n", re.MULTILINE | re.DOTALL)
MARKER = "@@readme-block@@"

# What differs on every run, and what it is replaced with before comparing.
VOLATILE = [
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)"), "<time>"),
    (re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d(:\d\d)?"), "<time>"),
    (re.compile(r"\b[0-9a-f]{64}\b"), "<hash>"),
    (re.compile(r"\b[0-9a-f]{4}…[0-9a-f]{4}\b"), "<hash>"),
    (re.compile(r"\bacc_[0-9a-f]{32}\b"), "<account id>"),
    (re.compile(r"\bkey_[A-Za-z0-9]+\b"), "<key id>"),
    (re.compile(r"\blk_[A-Za-z0-9_-]{20,}"), "<key>"),
    (re.compile(r"\bk[0-9a-f]{8}\b"), "<chain key>"),
    (re.compile(r"\b[0-9a-f]{32}\b"), "<request id>"),
    (re.compile(r"checkpoint-[^\s\"]+"), "<checkpoint>"),
]
# Response headers an answer may show; the rest (date, x-request-id...) change every time.
SHOWN_HEADERS = ("location", "idempotent-replayed", "retry-after", "www-authenticate", "content-disposition")


@dataclass
class Step:
    command: str
    answer_language: str | None
    answer: str | None
    # Offsets of the answer block in the README, to rewrite it when recording.
    answer_span: tuple[int, int] | None
    line: int


def steps(readme: str) -> list[Step]:
    start, end = readme.index(START), readme.index(END)
    found: list[Step] = []
    blocks = [match for match in FENCE.finditer(readme, start, end)]
    for index, block in enumerate(blocks):
        if block.group(1) != "sh":
            continue
        answer = None
        if index + 1 < len(blocks):
            following = blocks[index + 1]
            between = readme[block.end() : following.start()]
            if following.group(1) in ANSWER_LANGUAGES and not between.strip():
                answer = following
        found.append(
            Step(
                command=block.group(2),
                answer_language=answer.group(1) if answer else None,
                answer=answer.group(2) if answer else None,
                answer_span=(answer.start(2), answer.end(2)) if answer else None,
                line=readme.count("\n", 0, block.start()) + 1,
            )
        )
    return found


def run(steps_: list[Step], workdir: Path, port: int, timeout: float = 300) -> list[str]:
    """Run every step in one bash session; return what each printed (stdout)."""
    script = ["set -o pipefail"]
    for step in steps_:
        script.append(f"echo {MARKER}")
        script.append(step.command.replace("localhost:8000", f"localhost:{port}"))
        # curl's answers end without a newline: the next marker must start a line.
        script.append("echo")
    result = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    outputs = result.stdout.split(MARKER + "\n")[1:]
    if len(outputs) != len(steps_):
        raise AssertionError(
            f"the walkthrough stopped after {len(outputs)} of {len(steps_)} blocks (exit {result.returncode}):\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return [output.removesuffix("\n") for output in outputs]


def normalise(text: str) -> str:
    for pattern, replacement in VOLATILE:
        text = pattern.sub(replacement, text)
    return text


def _parse_json_documents(text: str) -> list[object]:
    decoder = json.JSONDecoder()
    documents, position = [], 0
    text = text.strip()
    while position < len(text):
        document, position = decoder.raw_decode(text, position)
        documents.append(document)
        while position < len(text) and text[position].isspace():
            position += 1
    return documents


def _matches(expected: object, actual: object) -> bool:
    if expected == "...":
        return True
    if isinstance(expected, dict) and isinstance(actual, dict):
        return expected.keys() == actual.keys() and all(_matches(expected[k], actual[k]) for k in expected)
    if isinstance(expected, list) and isinstance(actual, list):
        return len(expected) == len(actual) and all(_matches(e, a) for e, a in zip(expected, actual, strict=True))
    return bool(expected == actual)


def _split_http(text: str) -> tuple[str, dict[str, str], str]:
    head, _, body = text.replace("\r\n", "\n").partition("\n\n")
    lines = head.strip().splitlines()
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0].strip(), headers, body


def mismatch(step: Step, output: str) -> str | None:
    """Why `output` is not the answer the README shows, or None if it is."""
    assert step.answer is not None and step.answer_language is not None
    expected, actual = normalise(step.answer), normalise(output)
    if step.answer_language == "http":
        expected_status, expected_headers, expected_body = _split_http(expected)
        actual_status, actual_headers, actual_body = _split_http(actual)
        if expected_status.split()[:2] != actual_status.split()[:2]:
            return f"status {actual_status!r}, the README shows {expected_status!r}"
        for name, value in expected_headers.items():
            if actual_headers.get(name) != value:
                return f"header {name}: {actual_headers.get(name)!r}, the README shows {value!r}"
        expected, actual = expected_body, actual_body
        if not expected.strip():
            return None
    if step.answer_language in ("json", "http"):
        try:
            wanted, got = _parse_json_documents(expected), _parse_json_documents(actual)
        except ValueError as error:
            return f"not JSON ({error}): {actual[:2000]}"
        if len(wanted) != len(got) or not all(_matches(w, g) for w, g in zip(wanted, got, strict=True)):
            return f"got:\n{actual}\nthe README shows:\n{expected}"
        return None
    if [line.rstrip() for line in expected.strip().splitlines()] != [
        line.rstrip() for line in actual.strip().splitlines()
    ]:
        return f"got:\n{actual}\nthe README shows:\n{expected}"
    return None


def wrap_json(document: object, indent: int = 0, width: int = 96) -> str:
    """Compact JSON as curl prints it, broken between members where a line would pass
    `width`, so that the README stays readable (still one valid JSON document)."""
    compact = json.dumps(document, separators=(",", ":"), ensure_ascii=False)
    if not isinstance(document, (dict, list)) or indent + len(compact) <= width:
        return compact
    if isinstance(document, dict):
        opening, closing = "{", "}"
        items = [json.dumps(key, ensure_ascii=False) + ":" + wrap_json(value, indent + 1, width)
                 for key, value in document.items()]  # fmt: skip
    else:
        opening, closing = "[", "]"
        items = [wrap_json(value, indent + 1, width) for value in document]
    pad = " " * (indent + 1)
    lines, line = [], opening
    for index, item in enumerate(items):
        piece = item + ("," if index < len(items) - 1 else closing)
        at_start = line in (opening, pad)
        if not at_start and ("\n" in piece or indent + len(line) + len(piece.split("\n")[0]) > width):
            lines.append(line)
            line = pad
        line += piece
        if "\n" in piece:
            lines.append(line)
            line = pad
    if line.strip():
        lines.append(line)
    return "\n".join(lines)


def _keep_elisions(old: object, new: object) -> object:
    """The new answer, with "..." wherever the README's answer elided a value."""
    if old == "...":
        return "..."
    if isinstance(old, dict) and isinstance(new, dict):
        return {key: _keep_elisions(old.get(key), value) for key, value in new.items()}
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [_keep_elisions(o, n) for o, n in zip(old, new, strict=True)]
    return new


def _json_answer(old: str, new: str) -> str:
    documents = _parse_json_documents(new)
    try:
        previous = _parse_json_documents(old)
    except ValueError:
        previous = []
    if len(previous) == len(documents):
        documents = [_keep_elisions(o, n) for o, n in zip(previous, documents, strict=True)]
    return "\n".join(wrap_json(d) for d in documents)


def recorded_answer(step: Step, output: str) -> str:
    if step.answer_language == "http":
        status, headers, body = _split_http(output)
        shown = [f"{name}: {value}" for name, value in headers.items() if name in SHOWN_HEADERS]
        text = "\n".join([status, *shown])
        if body.strip():
            text += "\n\n" + _json_answer(_split_http(step.answer or "")[2], body)
        return text + "\n"
    if step.answer_language == "json":
        return _json_answer(step.answer or "", output) + "\n"
    return output.rstrip("\n") + "\n"


def record(readme_path: Path, steps_: list[Step], outputs: list[str]) -> None:
    readme = readme_path.read_text()
    for step, output in sorted(zip(steps_, outputs, strict=True), key=lambda pair: -pair[0].line):
        if step.answer_span is None:
            continue
        start, end = step.answer_span
        readme = readme[:start] + recorded_answer(step, output) + readme[end:]
    readme_path.write_text(readme)


if __name__ == "__main__":
    import sys
    import tempfile

    from tests.readme_service import fresh_service

    if sys.argv[1:] != ["--record"]:
        raise SystemExit("usage: python -m tests.readme_walkthrough --record")
    readme_path = Path(__file__).resolve().parent.parent / "README.md"
    walkthrough = steps(readme_path.read_text())
    with tempfile.TemporaryDirectory() as directory, fresh_service(Path(directory)) as port:
        record(readme_path, walkthrough, run(walkthrough, Path(directory), port))
    print(f"recorded {sum(step.answer is not None for step in walkthrough)} answers into {readme_path}")
