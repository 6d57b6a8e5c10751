"""Run train_gpt.main() (under torchrun, as the tests do), then print how many threads the process still has.

After destroy_process_group no gloo thread may outlive main(): one that is still releasing a finished collective's
tensors when the interpreter exits needs the GIL, and the process aborts ("terminate called without an active
exception"), at random, after a run that logged everything. A leftover thread shows that race deterministically.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
threads_before = len(os.listdir("/proc/self/task"))
import train_gpt  # noqa: E402

train_gpt.main()
print(f"threads_before_main:{threads_before} threads_after_main:{len(os.listdir('/proc/self/task'))}", flush=True)
