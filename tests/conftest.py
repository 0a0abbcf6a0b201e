import os
import sys
from pathlib import Path

# Tests import the project's top-level packages (engine, kernels, panels, bench) from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Triton kernels run on the CPU through the interpreter. triton.jit reads this when a kernel module is
# first imported, so it is set before any test imports triton (the engine imports it lazily).
os.environ.setdefault("TRITON_INTERPRET", "1")
