"""Log records from processes that share one pipe stay one per line (`run --jobs` children share the runner's stderr)."""

import json
import os
import subprocess
import sys

EMIT = """
from reid_batch import log
for i in range({count}):
    log.event("tick", writer={writer}, i=i, padding="x" * 100)
"""


def test_records_from_concurrent_processes_never_share_a_line():
    count, writers = 1500, 4
    # PYTHONUNBUFFERED is what our image sets; under it print() wrote a record and its newline as two writes.
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    read_end, write_end = os.pipe()
    children = [subprocess.Popen([sys.executable, "-c", EMIT.format(count=count, writer=w)],
                                 stderr=write_end, env=environment) for w in range(writers)]
    os.close(write_end)
    with os.fdopen(read_end, encoding="utf-8") as stream:
        lines = stream.read().splitlines()
    assert all(child.wait(timeout=120) == 0 for child in children)
    records = [json.loads(line) for line in lines]  # a line holding two records fails here
    assert len(records) == count * writers
    for w in range(writers):
        assert [r["i"] for r in records if r["writer"] == w] == list(range(count))
