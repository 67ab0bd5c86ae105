"""The benchmark: speed and quality of no-spec, strict and FLy in one report.

    python benchmarks/run_bench.py --help

See fly_vllm/bench/harness.py for what it measures; results go under
benchmarks/results/.
"""

import sys

from fly_vllm.bench.harness import main

if __name__ == "__main__":
    sys.exit(main())
