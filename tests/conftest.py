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


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot to them on a shared, busy CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    """The tiny Llama preset on the CPU in fp32 (the default CPU dtype)."""
    from engine import load_model

    return load_model("synthetic:tiny-llama", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def served_demo_app():
    """The app on the demo model (CPU), served on loopback with the command line's launch defaults."""
    import app as lab_app
    from engine.lab.session import LabSession

    session = LabSession()
    session.load("demo", device="cpu")
    demo = lab_app.build_app(session)
    options = lab_app.launch_kwargs(lab_app.parse_args([]), export_dir=session.export_dir)
    demo.queue(default_concurrency_limit=1).launch(prevent_thread_lock=True, quiet=True, **options)
    yield demo, session
    demo.close()


@pytest.fixture(scope="session")
def profile_cache(tmp_path_factory):
    """One quick hardware profile of this CPU in a temporary cache: offloaded runs read it, none measures again."""
    os.environ["KVLAB_CACHE_DIR"] = str(tmp_path_factory.mktemp("kvlab-cache"))
    import torch

    from engine.offload.profiler import hardware_profile

    # The CPU profile is keyed by thread count too: measure it for the one-thread tests (one_thread) as well.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    hardware_profile("cpu", quick=True)
    torch.set_num_threads(threads)
    return hardware_profile("cpu", quick=True)
