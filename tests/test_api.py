"""The app's API as a script meets it: every endpoint `Client.view_api()` lists is called with parameters made from
its documented signature alone (names, types, defaults, choices), and answers as documented: a named, typed result,
or a refusal that says why (never Gradio's opaque error or an "Unexpected" one). Every documented choice of a
parameter is tried; parameters left out keep what was applied."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import app as lab_app
from engine.lab.session import LabSession

OPAQUE = ("has not enabled verbose error reporting", "Unexpected ", "Traceback")
PEERS_RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results" / "peers.json"  # the committed H200 run
# Names a result may not have: Gradio's fallbacks when an output has no label.
UNNAMED = re.compile(r"^(value_\d+|\d+(st|nd|rd|th)|output|result_\d+)$")


@pytest.fixture(scope="module")
def served(profile_cache, one_thread):
    from gradio_client import Client

    session = LabSession()
    session.load("synthetic:tiny-llama", device="cpu", dtype="float32")
    demo = lab_app.build_app(session)
    demo.queue(default_concurrency_limit=1).launch(
        prevent_thread_lock=True, quiet=True, **lab_app.launch_kwargs(lab_app.parse_args([]), export_dir=session.export_dir))
    api = Client(demo.local_url, verbose=False)
    yield api, session, api.view_api(return_format="dict", print_info=False)["named_endpoints"]
    demo.close()


def _choices(schema: dict) -> list:
    """Every value a parameter's JSON schema documents as a choice (enums and consts), in order."""
    out = []
    for part in [schema, *schema.get("anyOf", []), *schema.get("oneOf", [])]:
        out += part.get("enum", [])
        if "const" in part:
            out.append(part["const"])
    return out


def _types(schema: dict) -> set:
    parts = [schema, *schema.get("anyOf", []), *schema.get("oneOf", [])]
    return {part.get("type") for part in parts if part.get("type")}


def _call(api, name: str, **kwargs):
    """(result, None) or (None, the refusal's message); a refusal must say why."""
    from gradio_client.exceptions import AppError

    try:
        return api.predict(**kwargs, api_name=name), None
    except AppError as exc:
        message = str(exc)
        assert message and not any(o in message for o in OPAQUE), f"{name}{kwargs}: an opaque refusal: {message!r}"
        return None, message


# What a parameter needs that its type alone does not say (a file to import, which model to load, ...).
def _examples(session) -> dict:
    from gradio_client import handle_file

    last = session.runs[-1].run_id if session.runs else 1
    examples = {"source": "synthetic:tiny-llama", "message": "Hello there", "history": [], "cursor": "", "step": 0,
                "run_id": last, "run_ids": [last], "max_new_tokens": 8, "batch": 2, "prompt_tokens": 32,
                "chunk_tokens": 16, "dtype": "float32", "device": "cpu"}
    if session.runs:
        examples["trace"] = handle_file(str(session.export_trace()))
    examples["results"] = handle_file(str(PEERS_RESULTS))
    return examples


def test_every_endpoint_and_result_is_named_and_typed(served):
    _, _, endpoints = served
    assert endpoints, "the app documents no endpoint"
    for name, info in endpoints.items():
        assert re.fullmatch(r"/[a-z_]+", name) and "lambda" not in name, name
        for returned in info["returns"]:
            assert not UNNAMED.match(returned["label"]), f"{name} returns an unnamed {returned['label']!r}"
            assert returned["python_type"]["type"] not in ("", "Any"), f"{name}: untyped result"
        for p in info["parameters"]:
            assert p["parameter_name"] and not UNNAMED.match(p["parameter_name"]), (name, p)
            assert p["python_type"]["type"] not in ("", "Any"), f"{name}({p['parameter_name']}): untyped"


def test_every_endpoint_answers_its_documented_signature(served, tmp_path):
    api, session, endpoints = served
    # A run first, so that the endpoints about runs have one (the profile itself is called from its signature too).
    order = ["/load_model", "/apply_settings", "/profile", *sorted(set(endpoints) - {"/load_model", "/apply_settings",
                                                                                     "/profile", "/import_run"}),
             "/import_run"]
    api.predict(api_name="/apply_settings", batch=2, prompt_tokens=32, max_new_tokens=8, placement="cpu",
                chunk_tokens=16)
    answered = {}
    for name in order:
        info = endpoints[name]
        examples = _examples(session)
        kwargs = {}
        for p in info["parameters"]:
            if p["parameter_name"] in examples and (not p["parameter_has_default"] or name == "/load_model"):
                kwargs[p["parameter_name"]] = examples[p["parameter_name"]]
            elif not p["parameter_has_default"]:
                raise AssertionError(f"{name}({p['parameter_name']}): required, and nothing here says what to pass")
        result, refused = _call(api, name, **kwargs)
        answered[name] = result if refused is None else refused
        if refused is None:
            assert isinstance(result, (dict, str)), (name, result)  # JSON, or a downloaded file's path
        elif name == "/explore":
            assert "No predictions here: the model runs on the CPU" in refused
        else:
            raise AssertionError(f"{name}{kwargs} refused with its documented parameters: {refused}")
    assert answered["/profile"]["status"] == "done" and answered["/runs"]["runs"]
    assert answered["/settings"]["settings"]["placement"] == "cpu"


@pytest.mark.parametrize("name", ["/apply_settings", "/load_model", "/export_compare", "/chat", "/profile_live"])
def test_every_documented_choice_of_every_parameter_is_taken(served, name):
    """What view_api() lists as a parameter's choices or type is what the endpoint accepts: each choice of a
    Literal, both ints of prefetch_distance, a number where it says float (the old API documented
    prefetch_distance as Literal['1', '2'] and refused '1')."""
    api, session, endpoints = served
    if not session.runs:
        api.predict(api_name="/apply_settings", batch=2, prompt_tokens=32, max_new_tokens=8)
        api.submit(api_name="/profile").result()
    base = {"/export_compare": {"run_ids": [session.runs[-1].run_id]}, "/chat": {"message": "hi", "max_new_tokens": 4},
            "/load_model": {"source": "synthetic:tiny-llama", "device": "cpu", "dtype": "float32"}}.get(name, {})
    tried = 0
    for p in endpoints[name]["parameters"]:
        values = _choices(p["type"])
        kinds = _types(p["type"])
        if "integer" in kinds:
            values += [{"prefetch_distance": 2, "max_new_tokens": 4, "batch": 1}.get(p["parameter_name"], 1)]
        if "number" in kinds:
            values += [{"split": 0.25, "gpu_kv_budget_gib": 0.5, "top_p": 0.5}.get(p["parameter_name"], 0.5)]
        for value in values:
            kwargs = base | {p["parameter_name"]: value}
            if name == "/apply_settings" and p["parameter_name"] == "gpu_kv_budget_gib":
                kwargs["placement"] = "hybrid"
            result, refused = _call(api, name, **kwargs)
            tried += 1
            if refused is not None:
                # Only what this machine cannot do may be refused, and it says so.
                assert any(why in refused for why in ("no GPU", "no CUDA GPU", "not supported on cpu")), \
                    f"{name}: documented {p['parameter_name']}={value!r} refused: {refused}"
            elif name == "/apply_settings":
                applied = result["settings"][p["parameter_name"]]
                assert applied == value or float(applied) == float(value), (p["parameter_name"], value, applied)
    assert tried
    api.predict(api_name="/apply_settings", **{"placement": "gpu", "split": "auto", "attention": "auto",
                                                "prefetch": "auto", "prefetch_distance": 1})
    if name == "/load_model":
        api.predict("synthetic:tiny-llama", "cpu", "float32", api_name="/load_model")


def test_parameters_left_out_keep_what_was_applied(served):
    api, _, _ = served
    full = api.predict(api_name="/apply_settings", placement="cpu", split=0.3, prompt_tokens=32, max_new_tokens=5,
                       chunk_tokens=8)["settings"]
    changed = api.predict(api_name="/apply_settings", placement="gpu")["settings"]
    assert changed == full | {"placement": "gpu"}
    # Another client has its own settings: the defaults, whatever this one applied.
    from gradio_client import Client

    other = Client(api.src, verbose=False)
    assert other.predict(api_name="/settings")["settings"]["placement"] == "gpu"
    assert other.predict(api_name="/settings")["settings"]["chunk_tokens"] == 512
    # the model runs on the CPU: the description says where "gpu" keeps the K/V on this machine
    described = other.predict(api_name="/settings")["description"]
    assert "resident beside the weights (in CPU memory: no GPU here)" in described and "on the GPU" not in described
    other.predict(api_name="/apply_settings", placement="cpu", chunk_tokens=64)
    assert api.predict(api_name="/settings")["settings"] == changed


def _readme_block(after: str, language: str) -> str:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index(f"```{language}\n", readme.index(after)) + len(language) + 4
    return readme[start:readme.index("```", start)]


def test_the_readmes_script_runs_as_written(served, capsys):
    """The README's gradio_client example, against this app (its address changed, nothing else)."""
    api, session, _ = served
    code = _readme_block("### The app from a script", "python").replace("http://127.0.0.1:7860/", api.src)
    exec(compile(code, "README.md (The app from a script)", "exec"), {})
    out = capsys.readouterr().out
    assert "tiny-llama" in out and "no GPU" in out  # the model it names, the reason for no prediction
    assert session.runs[-1].settings["offload.split"] == 0.5 and session.runs[-1].prompt_tokens == 256


def test_the_readmes_rest_call_keeps_what_it_leaves_null(served):
    """The README's REST call: every parameter in order, null to keep, one session for one client."""
    import httpx

    api, _, _ = served
    data = [None] * 15
    data[0], data[2] = "hybrid", 0.25
    with httpx.Client(base_url=api.src, timeout=60) as web:
        event = web.post("/gradio_api/call/apply_settings", json={"data": data, "session_hash": "readme"}).json()
        stream = web.get(f"/gradio_api/call/apply_settings/{event['event_id']}").text
        assert "event: complete" in stream, stream
        data[0], data[2] = None, None
        data[7] = 3  # batch, the rest kept
        event = web.post("/gradio_api/call/apply_settings", json={"data": data, "session_hash": "readme"}).json()
        stream = web.get(f"/gradio_api/call/apply_settings/{event['event_id']}").text
    applied = json.loads([line for line in stream.splitlines() if line.startswith("data: ")][-1][6:])[0]["settings"]
    assert (applied["placement"], applied["split"], applied["batch"]) == ("hybrid", 0.25, 3)


def test_the_settings_description_names_where_each_placement_keeps_the_kv():
    from engine.settings import GenerationSettings, OffloadSettings
    from panels.settings_panel import RunShape, describe_settings

    shape = RunShape(batch=2, prompt_tokens=16, seed=0)
    for placement in ("gpu", "cpu", "hybrid"):
        settings = GenerationSettings(offload=OffloadSettings(placement=placement))
        on_gpu, on_cpu = (describe_settings(settings, shape, on_gpu=flag).splitlines()[0] for flag in (True, False))
        assert on_gpu != on_cpu and "no GPU here" in on_cpu and "no GPU" not in on_gpu, (on_gpu, on_cpu)
        assert ("GPU budget auto" in on_cpu) == (placement == "hybrid")  # the budget is said on either device
