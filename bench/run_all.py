"""Runs every benchmark script and ends with one JSON line merging their headline figures.

Run: make bench   (or: .venv/bin/python bench/run_all.py [--quick])
"""

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["bench_extraction.py", "bench_steering.py", "bench_lens.py", "bench_training.py"]

merged = {}
for script in SCRIPTS:
    result = subprocess.run([sys.executable, str(HERE / script), *sys.argv[1:]], capture_output=True, text=True)
    sys.stdout.write(result.stdout)
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-3000:])
        sys.exit(f"{script} failed")
    last = json.loads(result.stdout.strip().splitlines()[-1])
    merged.update({key: value for key, value in last.items() if key not in ("benchmark", "models")})
print(json.dumps(merged))
