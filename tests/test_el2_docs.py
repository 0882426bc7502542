"""Every Python snippet of docs/el2.md runs (and its printed comments hold where checked)."""

import pathlib
import re

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "el2.md"


def test_el2_doc_snippets_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 3
    env: dict = {}
    for code in blocks:
        exec(compile(code, str(DOC), "exec"), env)
    out = capsys.readouterr().out.split("\n")
    assert out[0] == "0x10001 psci"
    assert out[1] == "-1 (17, 34) el3"
    assert out[2] == "0x84000060 -2 ffa"
    assert out[3] == "(1074266112, 43981)"
    assert out[4] == "-2"
    assert out[5:9] == ["0x10002", "SHARED_OWNED", "True", "OWNED"]
