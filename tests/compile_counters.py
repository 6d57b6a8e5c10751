"""Run train_gpt.main() in this process, then print what torch.compile did as one JSON line: graph breaks by
reason, the frames compiled, and the recompilations logged (tests/test_compile.py reads it).
"""
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
import torch._dynamo.utils  # noqa: E402

import train_gpt  # noqa: E402


class Recompiles(logging.Handler):
    def __init__(self):
        super().__init__()
        self.reasons = []

    def emit(self, record):
        self.reasons.append(record.getMessage().replace("\n", " ")[:400])


recompiles = Recompiles()
torch._logging.set_logs(recompiles=True)
logging.getLogger("torch._dynamo").addHandler(recompiles)
train_gpt.main()
counters = torch._dynamo.utils.counters
print("compile_counters " + json.dumps(dict(
    graph_breaks=dict(counters["graph_break"]), frames_ok=counters["frames"]["ok"],
    unique_graphs=counters["stats"]["unique_graphs"],
    recompiles=[r for r in recompiles.reasons if "ecompil" in r])), flush=True)
