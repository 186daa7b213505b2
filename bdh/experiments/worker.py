"""The child process of an experiment run: `python -m bdh.experiments.worker SPEC.json REPORT.json`.

Trains as SPEC says (bdh.experiments.runs.execute) and writes a report with this process's
peak memory, whatever the outcome.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

from bdh.experiments.runs import execute, peak_memory
from bdh.fileio import write_json


def main(argv: list[str]) -> int:
    spec_path, report_path = (Path(a) for a in argv)
    start = time.monotonic()
    report = {"status": "crashed", "message": "no result"}
    try:
        report = execute(json.loads(spec_path.read_text()))
    except BaseException as err:
        report = {"status": "crashed", "message": f"{type(err).__name__}: {err}"}
        traceback.print_exc()
    finally:
        report.update(peak_memory(), wall_s=round(time.monotonic() - start, 3))
        write_json(report_path, report)
    return 0 if report["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
