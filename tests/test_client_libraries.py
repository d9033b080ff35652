"""End to end: the README's LangChain and instructor snippets, run as written against a
real `dotllm serve` (only the server's address changes).

LangChain runs in this process; instructor in its own client environment
(`.venv/instructor`, `requirements/instructor.lock`: it cannot share openai 3.57's jiter).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.server

README_URL = "http://localhost:8000/v1"
INSTRUCTOR_PYTHON = Path(sys.executable).parents[1] / "instructor" / "bin" / "python"


def readme_snippets(heading: str) -> list[str]:
    """The ```python blocks of the README section under `## heading`."""
    readme = (REPO / "README.md").read_text()
    section = readme.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readme_has_both_snippets():
    langchain, instructor = readme_snippets("LangChain and instructor")
    assert "langchain_openai" in langchain and "import instructor" in instructor


def test_the_langchain_snippet(dotllm_server):
    code = readme_snippets("LangChain and instructor")[0].replace(
        README_URL, dotllm_server.base_url)
    scope: dict = {}
    exec(compile(code, "README.md (LangChain)", "exec"), scope)
    person_type = scope["Person"]
    for person in (scope["person"], scope["called"]):
        assert isinstance(person, person_type) and len(person.name) <= 12
    (call,) = scope["call"].tool_calls
    assert call["name"] == "get_weather" and call["args"]["city"] in ("Oslo", "Paris")


@pytest.mark.parametrize("mode", ["JSON_SCHEMA", "TOOLS"])
def test_the_instructor_snippet(dotllm_server, mode):
    code = readme_snippets("LangChain and instructor")[1].replace(
        README_URL, dotllm_server.base_url).replace("Mode.JSON_SCHEMA", f"Mode.{mode}")
    code += "\nprint(json.dumps({'type': type(person).__name__, **person.model_dump()}))\n"
    result = subprocess.run([str(INSTRUCTOR_PYTHON), "-c", "import json\n" + code],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    person = json.loads(result.stdout.splitlines()[-1])
    assert person["type"] == "Person" and len(person["name"]) <= 12
    assert isinstance(person["age"], int)
