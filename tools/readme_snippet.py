"""Print the first ```python block of a README section, so that checks run the README as written.

    python tools/readme_snippet.py "Python API" | .venv/bin/python -

Used by `make install-check` and tests/test_install.py.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def snippet(section: str, text: str) -> str:
    """The first ```python block under the `## <section>...` heading of markdown `text`."""
    heading = re.search(rf"^##+ {re.escape(section)}.*$", text, flags=re.M)
    if heading is None:
        raise ValueError(f"README has no section {section!r}")
    body = text[heading.end() :]
    next_heading = re.search(r"^##+ ", body, flags=re.M)
    body = body[: next_heading.start()] if next_heading else body
    block = re.search(r"^```python\n(.*?)^```", body, flags=re.M | re.S)
    if block is None:
        raise ValueError(f"README section {section!r} has no ```python block")
    return block.group(1)


if __name__ == "__main__":
    sys.stdout.write(
        snippet(sys.argv[1] if len(sys.argv) > 1 else "Python API", README.read_text())
    )
