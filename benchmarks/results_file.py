"""benchmarks/RESULTS.md: each benchmark script owns one marked block, which a new run replaces in place."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def write_block(name: str, heading: str, body: str) -> None:
    """Put `body` between `<!-- name:begin -->` and `<!-- name:end -->`, replacing the previous run's; the first
    run appends the block under `## heading`."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body}\n{end}"
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if begin in old:
        new = old.split(begin)[0] + block + old.split(end, 1)[1]
    else:
        new = old.rstrip() + f"\n\n## {heading}\n\n" + block + "\n"
    RESULTS.write_text(new)
    print(f"written to {RESULTS}")
