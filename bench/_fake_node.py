"""Run ``agentd`` with a constant-value fake NVML (8 GPUs) in place of the driver.

Used by bench/overhead.py so the daemon measured is the real one, end to end, minus the driver.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fake_pynvml import FakeNvml, install  # noqa: E402

if __name__ == "__main__":
    install(FakeNvml.with_gpus(8, power_mw=450_000, temp_c=55))
    from agentd.cli import main

    main()
