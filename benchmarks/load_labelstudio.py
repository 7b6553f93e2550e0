"""A bounded load test of the Label Studio ML backend, on loopback only.

    python benchmarks/load_labelstudio.py [--rounds 20,50] [--threads 8] [--out results/labelstudio_load.json]

Starts a loopback image server (tiles of the shipped nuclei sample) and a real `seggpt labelstudio serve`
(gunicorn, one worker, the demo model on the CPU, its own temporary state directory, the image server on
the allow-list), gives it one reference by webhook, then sends each round of N concurrent /predict calls
(3 tasks each) while a stream of /health probes runs (one every 50 ms). Prints one JSON object: failures,
p50/p95 latency per round, the worst /health latency, and the worker's RSS before, at peak and after.
Every connection goes to 127.0.0.1; the number of calls and every timeout are bounded.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "seggpt_plugins" / "demo" / "samples"
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Nucleus"/></BrushLabels>
</View>"""
TASKS_PER_CALL = 3
HEALTH_EVERY_S = 0.05


def tiles():
    import tifffile
    from PIL import Image

    image = tifffile.imread(SAMPLES / "nuclei2d.tif")
    mask = tifffile.imread(SAMPLES / "nuclei2d_mask.tif")
    low, high = float(image.min()), float(np.percentile(image, 99.8))
    image8 = np.clip((image.astype(np.float64) - low) / (high - low) * 255, 0, 255).astype(np.uint8)
    out = {}
    for r in range(0, 512, 128):
        for c in range(0, 512, 128):
            png = io.BytesIO()
            Image.fromarray(image8[r:r + 128, c:c + 128]).save(png, format="PNG")
            out[f"tile_{r}_{c}.png"] = (png.getvalue(), mask[r:r + 128, c:c + 128] > 0)
    return out


def image_server(files: dict):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            data = files.get(self.path.lstrip("/"))
            if data is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def worker_pid(master: int) -> int | None:
    try:
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def percentile(values, q):
    return round(float(np.percentile(values, q)), 3) if values else None


def main() -> int:
    import requests
    from label_studio_sdk.converter.brush import mask2rle

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", default="20,50", help="concurrent /predict calls per round (default: 20,50)")
    parser.add_argument("--threads", type=int, default=8, help="request threads of the worker (default: 8)")
    parser.add_argument("--timeout", type=float, default=120.0, help="client timeout per call, seconds")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    rounds = [int(n) for n in args.rounds.split(",") if n.strip()]
    if any(not 1 <= n <= 100 for n in rounds):
        parser.error("each round is 1..100 calls (a bounded load)")

    data = tiles()
    names = sorted(data)
    server = image_server({name: png for name, (png, _) in data.items()})
    images = f"http://127.0.0.1:{server.server_port}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    seggpt = Path(sys.executable).with_name("seggpt")
    command = [str(seggpt)] if seggpt.exists() else [sys.executable, "-m", "seggpt_plugins.cli"]
    state = tempfile.mkdtemp(prefix="seggpt-load-state-")
    log_path = Path(state) / "serve.log"
    command += ["labelstudio", "serve", "--host", "127.0.0.1", "--port", str(port), "--threads", str(args.threads),
                "--model", "demo", "--device", "cpu", "--state-dir", state,
                "--allow-host", f"127.0.0.1:{server.server_port}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "BASIC_AUTH_"))}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                   start_new_session=True)
    report: dict = {"device": "cpu", "model": "demo", "threads": args.threads, "tasks_per_call": TASKS_PER_CALL}
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the backend did not start; log:\n{log_path.read_text()[-3000:]}")
            try:
                health = requests.get(f"{url}/health", timeout=2)
                if health.status_code == 200 and health.json().get("model_status") == "UP":  # the model loaded
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        reference = names[0]
        annotation = {"id": 1, "task": 1, "project": 1, "was_cancelled": False, "ground_truth": False,
                      "updated_at": "2026-01-01T00:00:00Z",
                      "result": [{"from_name": "tag", "to_name": "image", "type": "brushlabels",
                                  "original_width": 128, "original_height": 128, "image_rotation": 0,
                                  "value": {"format": "rle", "brushlabels": ["Nucleus"],
                                            "rle": mask2rle(data[reference][1].astype(np.uint8) * 255)}}]}
        hook = {"action": "ANNOTATION_CREATED", "project": {"id": 1}, "annotation": annotation,
                "task": {"id": 1, "project": 1, "data": {"image": f"{images}/{reference}"}}}
        requests.post(f"{url}/webhook", json=hook, timeout=30).raise_for_status()
        master = process.pid
        worker = worker_pid(master)
        # one warm-up call (reference download, first forward pass), then the memory baseline
        warm = {"tasks": [{"id": 2, "data": {"image": f"{images}/{names[1]}"}}], "project": "1.1700000000",
                "label_config": CONFIG}
        requests.post(f"{url}/predict", json=warm, timeout=args.timeout).raise_for_status()
        report["worker_rss_mb"] = {"before": rss_mb(worker)}
        peak = [report["worker_rss_mb"]["before"] or 0.0]
        stop = threading.Event()
        health: list = []
        health_failures = [0]

        def sample_memory():
            while not stop.wait(0.1):
                value = rss_mb(worker)
                if value:
                    peak[0] = max(peak[0], value)

        def probe_health():
            session = requests.Session()
            while not stop.wait(HEALTH_EVERY_S):
                started = time.monotonic()
                try:
                    ok = session.get(f"{url}/health", timeout=10).status_code == 200
                except requests.RequestException:
                    ok = False
                health.append(time.monotonic() - started)
                health_failures[0] += not ok

        watchers = [threading.Thread(target=sample_memory, daemon=True),
                    threading.Thread(target=probe_health, daemon=True)]
        for thread in watchers:
            thread.start()
        report["rounds"] = []
        for concurrency in rounds:
            def call(k: int):
                tasks = [{"id": 100 + k * TASKS_PER_CALL + j,
                          "data": {"image": f"{images}/{names[1 + (k + j) % (len(names) - 1)]}"}}
                         for j in range(TASKS_PER_CALL)]
                body = {"tasks": tasks, "project": "1.1700000000", "label_config": CONFIG,
                        "params": {"login": None, "password": None, "context": None}}
                started = time.monotonic()
                try:
                    response = requests.post(f"{url}/predict", json=body, timeout=args.timeout)
                    status = response.status_code
                    ok = status == 200 and all(isinstance(r, dict) and r["result"] for r in response.json()["results"])
                except requests.RequestException as exc:
                    status, ok = type(exc).__name__, False
                return ok, status, time.monotonic() - started

            started = time.monotonic()
            with ThreadPoolExecutor(concurrency) as pool:
                outcomes = list(pool.map(call, range(concurrency)))
            latencies = [s for _, _, s in outcomes]
            statuses: dict = {}
            for _, status, _ in outcomes:
                statuses[str(status)] = statuses.get(str(status), 0) + 1
            report["rounds"].append({
                "concurrent_calls": concurrency, "failures": sum(not ok for ok, _, _ in outcomes),
                "statuses": statuses, "wall_s": round(time.monotonic() - started, 2),
                "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95),
                "max_s": round(max(latencies), 3)})
        stop.set()
        for thread in watchers:
            thread.join(15)
        time.sleep(1.0)
        report["worker_rss_mb"].update(peak=peak[0], after=rss_mb(worker))
        report["health"] = {"probes": len(health), "failures": health_failures[0],
                            "worst_ms": round(max(health) * 1000, 1) if health else None,
                            "p95_ms": round(float(np.percentile(health, 95)) * 1000, 1) if health else None}
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        server.shutdown()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0 if all(r["failures"] == 0 for r in report["rounds"]) else 1


if __name__ == "__main__":
    sys.exit(main())
