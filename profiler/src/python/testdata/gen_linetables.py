"""Writes the line-table golden file for the running interpreter.

Run with each interpreter: `python3.X gen_linetables.py > linetable-3.X.json`.
The oracle is CPython itself: `co_lines()` (3.10+) or `dis.findlinestarts`
(3.8/3.9), for every instruction offset of a function whose lines jump
forward by more than 127 (several lnotab entries, long varints), backward
(loops), span several lines (long-form locations) and have code without a
location (exception cleanup, 3.11+).
"""
import dis
import json
import sys

SRC = (
    "def sample(xs):\n"
    "    total = 0\n"
    "    for x in xs:\n"
    "        if x % 2:\n"
    "            total += (x *\n"
    "                      2)\n"
    "        else:\n"
    "            try:\n"
    "                total -= x\n"
    "            except ZeroDivisionError:\n"
    "                pass\n"
    "    with open('/dev/null') as f:\n"
    "        f.write('" + "a" * 150 + "'.upper())\n"
    + "\n" * 300
    + "    return total\n"
)

FIRSTLINENO = 1000
module = compile("\n" * (FIRSTLINENO - 1) + SRC, "sample.py", "exec")
code = next(c for c in module.co_consts if hasattr(c, "co_code"))
assert code.co_firstlineno == FIRSTLINENO

lines = {}
if hasattr(code, "co_lines"):
    for start, end, line in code.co_lines():
        for offset in range(start, end, 2):
            lines[offset] = line
else:
    starts = dict(dis.findlinestarts(code))
    line = None
    for offset in range(0, len(code.co_code), 2):
        line = starts.get(offset, line)
        lines[offset] = line

table = code.co_linetable if sys.version_info >= (3, 10) else code.co_lnotab
print(json.dumps({
    "version": "%d.%d.%d" % sys.version_info[:3],
    "firstlineno": code.co_firstlineno,
    "table": table.hex(),
    "code_bytes": len(code.co_code),
    "lines": [[offset, lines[offset]] for offset in sorted(lines)],
}))
