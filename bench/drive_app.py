"""Drive the app through its HTTP API, as a remote user would: load a model, apply settings, run a profile,
predict with the scheduler explorer, read the hardware table, and fetch the exported trace.

    python bench/drive_app.py --model synthetic:llama-2-7b --placement cpu --batch 8 --prompt-len 2048 \
        --new-tokens 12 --out DIR

Starts `python app.py` (loopback) in a subprocess and talks to it with gradio_client; what it prints is what
the panels show. The trace lands in DIR, ready for the Profile panel's Import button anywhere.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="synthetic:llama-2-7b")
    parser.add_argument("--placement", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--port", type=int, default=7861)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from gradio_client import Client

    server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--model", args.model, "--port", str(args.port)],
                              cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{args.port}/"
        for _ in range(600):  # loading a 7B preset takes a while
            try:
                client = Client(url, verbose=False)
                break
            except Exception:  # noqa: BLE001 - not up yet
                if server.poll() is not None:
                    raise SystemExit(f"the app exited with {server.returncode}")
                time.sleep(1)
        else:
            raise SystemExit("the app did not come up in 10 minutes")
        print("app up at", url, flush=True)
        from gradio_client.exceptions import AppError

        # Only what differs from the defaults; what is left out keeps its applied value.
        applied = client.predict(placement=args.placement, batch=args.batch, prompt_tokens=args.prompt_len,
                                 max_new_tokens=args.new_tokens, api_name="/apply_settings")
        print("apply_settings:", applied["description"], applied["notes"], flush=True)
        job = client.submit(api_name="/profile")
        for state in job:
            print("profile:", str(state)[:200], flush=True)
        print("profile result:", str(job.result())[:1500], flush=True)
        try:
            curve = client.predict(api_name="/explore")
            print("explore:", curve["auto_reason"], "auto", curve["auto_ms"], "ms", flush=True)
        except AppError as exc:
            print("explore:", exc, flush=True)
        print("hardware:", str(client.predict(api_name="/hardware"))[:1500], flush=True)
        served, note = client.predict(None, api_name="/export_trace"), ""
        args.out.mkdir(parents=True, exist_ok=True)
        path = Path(served if isinstance(served, str) else served["path"])
        shutil.copy(path, args.out / f"app_{path.name}")
        print("trace:", args.out / f"app_{path.name}", note, flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
