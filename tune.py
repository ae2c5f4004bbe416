"""Entry point: `python tune.py` runs the default Time-VLM study; `python tune.py --help` for the rest.

Submit to a Ray cluster with `ray job submit --working-dir . -- python tune.py --study joint`.
"""
import sys

from timevlm_platform.cli import main

if __name__ == "__main__":
    sys.exit(main())
