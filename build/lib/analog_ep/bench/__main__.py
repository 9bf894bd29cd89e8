"""Worker entry: `python -m analog_ep.bench '<job json>'` runs one measurement and prints its JSON result."""

import json
import sys

from analog_ep.bench.jobs import worker

if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.argv[1]))))
