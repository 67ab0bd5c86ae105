"""Benchmark OpenAI-compatible endpoints under load; see fly_vllm/bench/serve.py.

    python benchmarks/bench_serve.py --endpoint fly=http://NODE:8000 --concurrency 1,8,32
"""

import sys

from fly_vllm.bench.serve import main

if __name__ == "__main__":
    sys.exit(main())
