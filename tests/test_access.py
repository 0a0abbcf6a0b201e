"""Remote clients may not load models by filesystem path unless the operator allowed a models directory.

The policy alone (engine/lab/access.py) over awkward paths, then the app served on this machine's non-loopback
address (with auth, as the app requires there) and called over it, so the request really comes from "another
machine" as the server sees it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import app as lab_app
from network import non_loopback_ipv4
from engine.lab.access import AccessDeniedError, SourcePolicy
from engine.errors import ModelLoadError
from engine.lab.session import LabSession

DEMO_DIR = Path(lab_app.__file__).resolve().parent / "assets" / "demo-model"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """An allowed models directory holding one real model folder (the demo model's files, linked)."""
    root = tmp_path_factory.mktemp("models")
    (root / "bard").mkdir()
    for item in DEMO_DIR.iterdir():
        if item.is_file():
            (root / "bard" / item.name).symlink_to(item)
    outside = tmp_path_factory.mktemp("outside")
    (outside / "config.json").write_text("{}")
    (root / "escape").symlink_to(outside, target_is_directory=True)  # a link inside that leads out
    return root


@pytest.mark.parametrize("source", ["demo", "synthetic:tiny-llama", "  synthetic:llama-2-7b ", "meta-llama/Llama-2-7b-hf"])
def test_remote_clients_may_load_built_in_sources_and_hub_ids(source):
    assert SourcePolicy().resolve(source, remote=True) == source.strip()


@pytest.mark.parametrize("source", ["/etc", "/etc/passwd", "./assets/demo-model", "../x", "~/models/m", "bard",
                                    str(DEMO_DIR), "assets/demo-model"])
def test_remote_clients_may_not_load_paths_without_a_models_directory(source):
    # "assets/demo-model" looks like a hub id (org/name) but names a directory here: it is a path.
    with pytest.raises(AccessDeniedError, match=r"refused for clients on other machines.*--models-dir"):
        SourcePolicy().resolve(source, remote=True)


@pytest.mark.parametrize("source", ["/etc", "assets/demo-model", "bard", "../x"])
def test_local_clients_load_any_path(source):
    assert SourcePolicy().resolve(source, remote=False) == source


def test_inside_the_models_directory_names_and_paths_resolve(models_dir):
    policy = SourcePolicy(models_dir)
    assert policy.resolve("bard", remote=True) == str(models_dir.resolve() / "bard")
    assert policy.resolve(str(models_dir / "bard"), remote=True) == str(models_dir.resolve() / "bard")
    assert policy.resolve("synthetic:tiny-llama", remote=True) == "synthetic:tiny-llama"
    assert policy.models() == ["bard"]  # escape/ holds a config.json but lies outside: listed only if inside


@pytest.mark.parametrize("source", ["../outside", "bard/../../outside", "escape", "/etc", str(DEMO_DIR)])
def test_nothing_outside_the_models_directory(models_dir, source):
    with pytest.raises(AccessDeniedError, match="outside the allowed models directory.*bard"):
        SourcePolicy(models_dir).resolve(source, remote=True)


def test_a_models_directory_that_is_not_one_is_refused_at_start(tmp_path):
    with pytest.raises(ModelLoadError, match="not a directory"):
        SourcePolicy(tmp_path / "missing")
    with pytest.raises(SystemExit, match="not a directory"):
        lab_app.main(["--models-dir", str(tmp_path / "missing")])


def _serve(session: LabSession, host: str):
    args = lab_app.parse_args(["--host", host, "--auth", "kv:lab-secret"])
    demo = lab_app.build_app(session)
    demo.queue(default_concurrency_limit=1).launch(prevent_thread_lock=True, quiet=True,
                                                   **lab_app.launch_kwargs(args, export_dir=session.export_dir))
    return demo


@pytest.fixture(scope="module")
def remote_address():
    address = non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to serve a remote client on")
    return address


def _load(client, source: str) -> str:
    """What the client is told: "Loaded <name>", or the refusal's message."""
    from gradio_client.exceptions import AppError

    try:
        return f"Loaded {client.predict(source, 'cpu', 'auto', api_name='/load_model')['model']['name']}"
    except AppError as exc:
        return str(exc)


def test_over_the_network_a_path_is_refused_and_the_model_kept(remote_address):
    from gradio_client import Client

    session = LabSession()
    session.load("synthetic:tiny-llama", device="cpu", dtype="float32")
    demo = _serve(session, remote_address)
    try:
        assert remote_address in demo.local_url or demo.server_name == remote_address
        client = Client(f"http://{remote_address}:{demo.server_port}/", auth=("kv", "lab-secret"), verbose=False)
        for source in (str(DEMO_DIR), "assets/demo-model", "/etc"):
            status = _load(client, source)
            assert "refused for clients on other machines" in status and "--models-dir" in status, status
            assert "kept" in status and session.model.source == "synthetic:tiny-llama"
        status = _load(client, "synthetic:tiny-qwen2")
        assert "Loaded" in status and session.model.source == "synthetic:tiny-qwen2"
    finally:
        demo.close()


def test_over_the_network_the_allowed_directory_loads_by_name(remote_address, models_dir):
    from gradio_client import Client

    session = LabSession(models_dir=models_dir)
    session.load("synthetic:tiny-llama", device="cpu", dtype="float32")
    demo = _serve(session, remote_address)
    try:
        client = Client(f"http://{remote_address}:{demo.server_port}/", auth=("kv", "lab-secret"), verbose=False)
        status = _load(client, "escape")
        assert "outside the allowed models directory" in status and session.model.source == "synthetic:tiny-llama"
        status = _load(client, "bard")
        assert "Loaded" in status and Path(session.model.source) == models_dir.resolve() / "bard"
    finally:
        demo.close()


def test_on_loopback_the_operator_loads_a_path(client):
    api, session = client
    try:
        status = _load(api, str(DEMO_DIR))
        assert "Loaded" in status and session.model.source == str(DEMO_DIR)
    finally:
        assert "Loaded" in _load(api, "demo")


@pytest.fixture(scope="module")
def client(served_demo_app):
    from gradio_client import Client

    demo, session = served_demo_app
    return Client(demo.local_url, verbose=False), session


def test_the_served_process_lets_the_engine_take_the_gil_back_quickly(tmp_path):
    """The app serves from the engine's process: main() shortens CPython's GIL switch interval before anything
    else can run (a server thread answering a poll would otherwise hold the decode thread up to 5 ms per op)."""
    import sys

    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    try:
        with pytest.raises(SystemExit, match="not a directory"):
            lab_app.main(["--models-dir", str(tmp_path / "missing")])
        assert sys.getswitchinterval() == pytest.approx(lab_app.GIL_SWITCH_INTERVAL_S)
        assert lab_app.GIL_SWITCH_INTERVAL_S <= 0.0005
    finally:
        sys.setswitchinterval(before)
