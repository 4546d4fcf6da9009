"""One zero-shot table from several `larosa eval tasks --json` outputs (the first dense run is the reference).

Usage: python3 benchmarks/tasks_table.py RUN.json [RUN.json ...]
"""

import json
import sys

from larosa.eval.tasks import table

print(table([json.loads(open(path).read()) for path in sys.argv[1:]]))
