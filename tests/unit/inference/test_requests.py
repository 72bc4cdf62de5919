"""The rows the Gateway sends and the steps it gets back: plain data that crosses processes."""

import pickle
import subprocess
import sys

from llava_platform.inference.requests import DecodeRequest, StepOutput


def test_requests_do_not_share_their_stop_lists_and_survive_pickling():
    a, b = DecodeRequest([1, 2], 4), DecodeRequest([3], 2, temperature=0.7, seed=5)
    a.stop.append("\n")
    assert b.stop == [] and a.temperature == 0.0 and not a.cancelled
    for obj in (a, b, StepOutput("hi", 2, "stop", batch_rows=3)):
        assert pickle.loads(pickle.dumps(obj)) == obj


def test_the_module_needs_no_torch():
    code = "import sys, llava_platform.inference.requests; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
