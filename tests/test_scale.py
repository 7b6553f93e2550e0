"""seggpt_plugins.scale: labelling many inputs in-process or on Ray Data, resumable, from local disk or S3.

The slow tests run against real components started here: a two-node Ray cluster on 127.0.0.1 (`ray
start --head` and a second `ray start --address`), and moto's S3 server on a loopback port. The Ray
runs use a tiny random model (its labels are mostly empty, which is fine: they are compared file by
file with the in-process engine's); the in-process test uses the demo model on real nuclei.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seggpt_plugins.cli import main
from seggpt_plugins.errors import InputError
from seggpt_plugins.scale import iter_sources
from seggpt_plugins.scale.records import RECORDS, RUN_FOLDER

TILE = 32
CLUSTER_TILES = 240
# the test cluster listens on loopback only: no usage reports, no token (a ~/.ray/auth_token left by a
# local Ray would otherwise switch token authentication on for the head but not for the others)
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def nuclei_tiles(folder: Path, nuclei2d, count: int, size: int = TILE, step: int = 16) -> Path:
    """`count` tiles of stardist's nuclei image as 8-bit PNGs in row folders, an example pair, and one
    corrupt file (tiles/row000/zz_corrupt.png)."""
    image, truth = nuclei2d
    scaled = np.clip(image / np.percentile(image, 99.8) * 255, 0, 255).astype(np.uint8)
    Image.fromarray(scaled[:128, :128]).save(folder / "prompt.png")
    Image.fromarray((truth[:128, :128] > 0).astype(np.uint8)).save(folder / "prompt_mask.png")
    corners = [(r, c) for r in range(128, 512 - size, step) for c in range(0, 512 - size, step)][:count]
    for r, c in corners:
        row = folder / "tiles" / f"row{r:03d}"
        row.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scaled[r:r + size, c:c + size]).save(row / f"c{c:03d}.png")
    (folder / "tiles" / f"row{corners[0][0]:03d}" / "zz_corrupt.png").write_bytes(b"not a PNG at all")
    return folder


def segment_args(folder: Path, out, model, *extra) -> list[str]:
    return ["segment", str(folder / "tiles"), "--prompt", str(folder / "prompt.png"), str(folder / "prompt_mask.png"),
            "--out", str(out), "--model", str(model), "--device", "cpu", "--output", "instances",
            "--format", "png", "coco", *extra]


def review(out: Path):
    import pyarrow.parquet as pq

    return pq.read_table(out / "review.parquet").to_pylist()


def output_files(out: Path) -> dict[str, bytes]:
    """Every output file but the run's own bookkeeping (and review.parquet, compared as a table)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and RUN_FOLDER not in p.parts and p.name != "review.parquet"}


def assert_exactly_once(out: Path, inputs: int, failed: int = 1) -> None:
    rows = review(out)
    assert len(rows) == inputs and len({r["path"] for r in rows}) == inputs
    assert sum(r["status"] == "failed" for r in rows) == failed
    coco = json.loads((out / "coco.json").read_text())
    names = [i["file_name"] for i in coco["images"]]
    assert len(names) == len(set(names)) == inputs - failed
    assert [i["id"] for i in coco["images"]] == list(range(1, len(names) + 1))
    assert len(list(out.rglob("*_instances.png"))) == inputs - failed


# ------------------------------------------------------------------------------------------ sources


def test_sources_folders_globs_and_manifests(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name in ("a/x.png", "a/b/y.tif", "a/.hidden/z.png", "a/notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    folder = [(Path(i.uri).relative_to(tmp_path).as_posix(), i.stem) for i in iter_sources([str(tmp_path / "a")])]
    assert folder == [("a/b/y.tif", "b/y"), ("a/x.png", "x")]
    assert [i.stem for i in iter_sources([f"{tmp_path}/a/**/*.tif"])] == ["a/b/y"]
    (tmp_path / "list.csv").write_text("id,path\n1,a/x.png\n2,a/b/y.tif\n")
    (tmp_path / "list.jsonl").write_text('{"uri": "a/x.png"}\n\n{"uri": "s3://bucket/k/v.png"}\n')
    pq.write_table(pa.table({"path": ["a/b/y.tif"]}), tmp_path / "list.parquet")
    items = list(iter_sources([str(tmp_path / n) for n in ("list.csv", "list.jsonl", "list.parquet")]))
    assert [i.stem for i in items] == ["a/x", "a/b/y", "a/x", "bucket/k/v", "a/b/y"]
    assert items[0].uri == f"{tmp_path}/a/x.png" and items[3].uri == "s3://bucket/k/v.png"
    (tmp_path / "bad.csv").write_text("file\na.png\n")
    with pytest.raises(InputError, match="needs a 'path' or 'uri' column"):
        list(iter_sources([str(tmp_path / "bad.csv")]))
    (tmp_path / "up.csv").write_text("path\n../escape.png\n")
    with pytest.raises(InputError, match="climbs out"):
        list(iter_sources([str(tmp_path / "up.csv")]))


# ------------------------------------------------------------------------------------ in-process


def test_local_engine_labels_resumes_and_reports_failures(tmp_path, nuclei2d, capsys):
    """The demo model on real nuclei: label maps mirror the tree, COCO and review.parquet hold one entry
    per input, a corrupt file is a failed row (exit 1), and a run cut short finishes on the rerun."""
    folder = nuclei_tiles(tmp_path, nuclei2d, 6, size=64, step=64)
    out = tmp_path / "out"
    assert main(segment_args(folder, out, "demo", "--engine", "local", "--batch-size", "4")) == 1
    assert "1 input(s) failed" in capsys.readouterr().err
    assert_exactly_once(out, 7)
    rows = {Path(r["path"]).name: r for r in review(out)}
    assert rows["zz_corrupt.png"]["status"] == "failed" and "not a readable image" in rows["zz_corrupt.png"]["reason"]
    done = [r for r in rows.values() if r["status"] == "done"]
    assert all(r["classes"] in ([], [1]) and 0 < r["confidence"] <= 1 for r in done)
    assert sum(r["instances"] > 0 for r in done) >= 4  # real nuclei, found
    assert all(r["prompts"] == [str(folder / "prompt.png")] for r in done)
    coco = json.loads((out / "coco.json").read_text())
    assert len(coco["annotations"]) == sum(r["instances"] for r in done) and coco["categories"][0]["id"] == 1
    first = sorted(out.rglob("*_instances.png"))[0]
    assert np.asarray(Image.open(first)).max() > 0
    before = output_files(out)
    # as if killed after three inputs: their records and maps stay, the rest are gone
    records = sorted((out / RECORDS).rglob("*.json"))
    for record in records[3:]:
        record.unlink()
    for labels in sorted(out.rglob("*_instances.png"))[3:]:
        labels.unlink()
    (out / "coco.json").unlink()
    half = next(out.rglob("*_instances.png"))  # a write the kill cut: its temporary file stays behind
    (half.parent / f".{half.name}.x1y2z3.part").write_bytes(b"\x89PNG half")
    assert main(segment_args(folder, out, "demo", "--engine", "local", "--batch-size", "4")) == 1
    assert "(4 by this run" in capsys.readouterr().out  # the 3 missing + the failed one, retried
    assert output_files(out) == before
    assert_exactly_once(out, 7)


def test_scaled_run_checks_its_settings_before_work(tmp_path, nuclei2d, capsys):
    folder = nuclei_tiles(tmp_path, nuclei2d, 2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    assert main(segment_args(folder, out, "demo", "--engine", "local")) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main(segment_args(folder, tmp_path / "o2", "demo", "--engine", "local", "--overlay")) == 2
    assert "--overlay: not with --engine" in capsys.readouterr().err
    assert main(segment_args(folder, tmp_path / "o3", "/no/model", "--engine", "local")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error" in err


def test_two_inputs_with_one_output_name(tmp_path, nuclei2d, capsys):
    """a.png and a.tif would both write a_labels.png: the second is a failed row, the first keeps its files."""
    folder = nuclei_tiles(tmp_path, nuclei2d, 1)
    row = next((folder / "tiles").iterdir())
    (row / "zz_corrupt.png").unlink()
    tile = next(row.glob("*.png"))
    Image.open(tile).save(tile.with_suffix(".tif"))
    out = tmp_path / "out"
    assert main(segment_args(folder, out, "demo", "--engine", "local", "--format", "png")) == 1
    rows = review(out)
    assert [r["status"] for r in rows] == ["done", "failed"] and "is taken by another input" in rows[1]["reason"]
    assert rows[0]["path"].endswith(".png") and len(list(out.rglob("*_instances.png"))) == 1


def test_predictor_chooses_the_most_similar_examples(tmp_path, nuclei2d):
    """SegGPTPredictor on a batch as read_binary_files gives it: one model, examples chosen per target."""
    from seggpt_plugins.scale import SegGPTPredictor

    folder = nuclei_tiles(tmp_path, nuclei2d, 2)
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(tmp_path / "white.png")
    Image.fromarray(np.eye(64, dtype=np.uint8)).save(tmp_path / "white_mask.png")
    predictor = SegGPTPredictor([(str(tmp_path / "white.png"), str(tmp_path / "white_mask.png")),
                                 (str(folder / "prompt.png"), str(folder / "prompt_mask.png"))],
                                model="demo", device="cpu", most_similar=1, quality=None)
    files = sorted((folder / "tiles").rglob("*.png"))
    batch = {"path": np.asarray([str(f) for f in files], dtype=object),
             "bytes": np.asarray([f.read_bytes() for f in files], dtype=object)}
    rows = predictor(batch)
    assert list(rows["status"]) == ["done", "done", "failed"]
    assert [json.loads(p) for p in rows["prompts"][:2]] == [[str(folder / "prompt.png")]] * 2
    assert rows["labels"][0].shape == (TILE, TILE) and rows["labels"][2].size == 0
    assert np.isnan(rows["confidence"][2]) and "zz_corrupt.png" in rows["reason"][2]


# ------------------------------------------------------------------------- a real two-node Ray cluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(args: list[str], log: Path) -> subprocess.Popen:
    """`ray start --block ...` in its own process group (SIGTERM stops the node and its workers)."""
    ray = Path(sys.executable).with_name("ray")
    env = {**os.environ, **RAY_ENV}
    return subprocess.Popen([str(ray), "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                             "--disable-usage-stats", *args], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True, env=env)


def wait_for_nodes(address: str, count: int, timeout: float = 90) -> None:
    code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False); "
            "print(sum(n['Alive'] for n in ray.nodes()))")
    deadline = time.time() + timeout
    while time.time() < deadline:
        result = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True,
                                env={**os.environ, **RAY_ENV})
        if result.returncode == 0 and result.stdout.strip() == str(count):
            return
        time.sleep(1)
    raise RuntimeError(f"the Ray cluster at {address} did not come up with {count} nodes")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head node and a worker node on 127.0.0.1, one CPU each; stopped at the end of the module."""
    pytest.importorskip("ray.data")
    logs = tmp_path_factory.mktemp("ray-logs")
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = start_node(["--head", "--port", str(port), "--include-dashboard", "false"], logs / "head.log")
    time.sleep(3)
    nodes = {"head": head, "worker": start_node(["--address", address], logs / "worker.log")}
    try:
        wait_for_nodes(address, 2)
        yield {"address": address, "nodes": nodes}
    finally:
        for name in ("worker", "head"):
            node = nodes[name]
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
                try:
                    node.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(node.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def tiles_and_reference(tmp_path_factory, nuclei2d):
    """A few hundred tiles, a tiny random model saved to disk, and the in-process engine's outputs."""
    from tests.conftest import random_net

    folder = nuclei_tiles(tmp_path_factory.mktemp("scale"), nuclei2d, CLUSTER_TILES)
    random_net(seed=1, image_size=[128, 64], patch_size=8, pretrain_image_size=64).save_pretrained(folder / "model")
    reference = folder / "reference"
    assert main(segment_args(folder, reference, folder / "model", "--engine", "local")) == 1
    assert_exactly_once(reference, CLUSTER_TILES + 1)
    return folder, reference


def ray_segment(folder: Path, out: Path, address: str, *extra, env=None) -> subprocess.Popen:
    """The CLI as a separate driver process (so that the test can kill it)."""
    args = segment_args(folder, out, folder / "model", "--engine", "ray", "--ray-address", address,
                        "--cpus-per-actor", "0.4", *extra)
    env = {**os.environ, **RAY_ENV, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "seggpt_plugins.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def finish(process: subprocess.Popen, timeout: float = 180) -> tuple[int, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"the run did not finish in {timeout} s:\n{out}{err}") from None
    return process.returncode, out + err


def wait_for_records(out: Path, count: int, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if (out / RECORDS).exists() and sum(1 for _ in (out / RECORDS).rglob("*.json")) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"the run did not reach {count} records (exit {process.poll()})")


def assert_same_as(out: Path, reference: Path) -> None:
    ours, theirs = output_files(out), output_files(reference)
    assert sorted(ours) == sorted(theirs)  # the same file names (a failure lists the odd ones)
    assert [name for name in ours if ours[name] != theirs[name]] == []  # the same bytes
    assert review(out) == review(reference)


def descendants(pid: int) -> dict[int, str]:
    """{pid: command} of a process's descendants (from /proc)."""
    parents, names = {}, {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            names[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:80]
        except (OSError, ValueError):
            continue
        parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    found, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for child in (c for c, p in parents.items() if p == parent and c not in found):
            found[child] = names[child]
            todo.append(child)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_local_ray_fits_the_machine_and_ends_with_its_driver(tiles_and_reference):
    """Issue 29, item 4: as many actors as this machine has CPUs (at most 4) on a Ray of the run's own, no
    --cpus-per-actor (1 CPU each left nothing for the listing tasks: the run hung); a SIGKILLed driver
    leaves no Ray process behind; the rerun finishes, without Ray's log lines on the terminal."""
    folder, reference = tiles_and_reference
    out = folder / "local-ray"
    actors = str(min(os.cpu_count() or 1, 4))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ENV, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "seggpt_plugins.cli",
               *segment_args(folder, out, folder / "model", "--engine", "ray", "--actors", actors)]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_for_records(out, 20, driver)
    ray_processes = descendants(driver.pid)
    assert any("raylet" in name for name in ray_processes.values()), ray_processes
    driver.send_signal(signal.SIGKILL)
    driver.communicate()
    deadline = time.time() + 60
    while (alive := {p: n for p, n in ray_processes.items() if Path(f"/proc/{p}").exists()
                     and "(Z)" not in " ".join(Path(f"/proc/{p}/stat").read_text().split()[1:3])}) \
            and time.time() < deadline:
        time.sleep(0.5)
    assert not alive  # the agents (and the actors in mid-batch) are gone too
    code, log = finish(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env=env))
    assert code == 1 and "1 input(s) failed" in log, log
    assert not [line for line in log.splitlines() if "warning" in line.lower() or "core_worker" in line
                or "INFO" in line], log
    assert_exactly_once(out, CLUSTER_TILES + 1)
    assert_same_as(out, reference)


def test_actors_are_fitted_to_the_ray_they_run_on(capsys):
    from seggpt_plugins.scale.pipeline import fit_actors

    two_cpus = {"CPU": 2.0}
    assert fit_actors(1, None, 0, two_cpus, local=True) == 1.0
    assert fit_actors(2, None, 0, two_cpus, local=True) == 0.95  # a share each, 0.1 left for the listing
    assert fit_actors(4, 0.4, 0, two_cpus, local=True) == 0.4
    with pytest.raises(InputError, match="--actors 3 with --cpus-per-actor 1 need 3 CPU.*has 2: give fewer --actors"):
        fit_actors(3, None, 0, two_cpus, local=True)
    with pytest.raises(InputError, match="or a smaller --cpus-per-actor"):
        fit_actors(2, 1.0, 0, two_cpus, local=True)
    with pytest.raises(InputError, match="need 2 GPU"):
        fit_actors(2, 0.5, 1, {"CPU": 8.0, "GPU": 1.0}, local=True)
    assert fit_actors(8, None, 1, {"CPU": 2.0}, local=False) == 1.0  # a cluster may grow: a warning
    assert "the run waits until the cluster has them" in capsys.readouterr().err


def test_a_finished_run_resumed_lists_nothing_to_do(tmp_path):
    """A resumed run whose groups are all done lists none (and so starts no Ray and loads no model)."""
    from seggpt_plugins.scale.pipeline import _write_listing
    from seggpt_plugins.scale.records import record_name
    from seggpt_plugins.scale.sources import Item
    from seggpt_plugins.scale.storage import Store

    store = Store(tmp_path)
    items = [Item(uri=f"/data/{k}.png", stem=f"{k}") for k in range(5)]
    for item in items[:4]:
        store.put(record_name(item.stem), json.dumps({"path": item.uri, "status": "done"}).encode())
    assert _write_listing(lambda: iter(items), store, 2, 1) == (1, 1)  # the group of the fifth input only
    store.put(record_name("4"), json.dumps({"path": "/data/4.png", "status": "failed"}).encode())
    assert _write_listing(lambda: iter(items), store, 2, 1) == (1, 1)  # a failed input is tried again
    store.put(record_name("4"), json.dumps({"path": "/data/4.png", "status": "done"}).encode())
    assert _write_listing(lambda: iter(items), store, 2, 1) == (0, 0)


@pytest.mark.slow
def test_ray_engine_equals_the_local_engine(cluster, tiles_and_reference):
    folder, reference = tiles_and_reference
    out = folder / "ray"
    code, log = finish(ray_segment(folder, out, cluster["address"], "--actors", "2"))
    assert code == 1 and "1 input(s) failed" in log, log
    assert_same_as(out, reference)


@pytest.mark.slow
def test_driver_killed_mid_run_then_rerun_labels_each_input_once(cluster, tiles_and_reference):
    folder, reference = tiles_and_reference
    out = folder / "killed"
    driver = ray_segment(folder, out, cluster["address"])
    wait_for_records(out, 40, driver)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    done_before = sum(1 for _ in (out / RECORDS).rglob("*.json"))
    assert 40 <= done_before < CLUSTER_TILES + 1 and not (out / "review.parquet").exists()
    code, log = finish(ray_segment(folder, out, cluster["address"]))
    assert code == 1, log
    labelled_now = int(log.split(" by this run")[0].rsplit("(", 1)[1])
    assert labelled_now <= CLUSTER_TILES + 1 - done_before + 1  # the rest (and the failed input, retried)
    assert_exactly_once(out, CLUSTER_TILES + 1)
    assert_same_as(out, reference)


@pytest.mark.slow
def test_s3_input_and_output_through_a_real_s3_server(cluster, tiles_and_reference):
    """Tiles in a bucket of moto's S3 server (its own process on a loopback port), labels into another
    prefix, on the Ray cluster: the same label maps as the local reference."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    folder, reference = tiles_and_reference
    port = free_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import s3fs

        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline, "moto's S3 server did not start"
                time.sleep(0.2)
        fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=env["AWS_ENDPOINT_URL"],
                               skip_instance_cache=True)
        fs.mkdir("data")
        rows = sorted((folder / "tiles").iterdir())[:2]  # two row folders: ~60 tiles and the corrupt file
        for row in rows:
            fs.put(str(row), f"data/tiles/{row.name}", recursive=True)
        fs.put(str(folder / "prompt.png"), "data/prompt.png")
        fs.put(str(folder / "prompt_mask.png"), "data/prompt_mask.png")
        args = ["segment", "s3://data/tiles/", "--prompt", "s3://data/prompt.png", "s3://data/prompt_mask.png",
                "--out", "s3://data/labels", "--model", str(folder / "model"), "--device", "cpu", "--output",
                "instances", "--format", "png", "coco", "--engine", "ray", "--ray-address", cluster["address"],
                "--cpus-per-actor", "0.4"]
        driver = subprocess.Popen([sys.executable, "-m", "seggpt_plugins.cli", *args], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env={**os.environ, **RAY_ENV, **env})
        code, log = finish(driver)
        inputs = sum(len(list(row.iterdir())) for row in rows)
        assert code == 1 and f"{inputs - 1} of {inputs} input(s) labelled" in log, log
        fs.invalidate_cache()
        for row in rows:
            for tile in row.glob("c*.png"):
                key = f"data/labels/{row.name}/{tile.stem}_instances.png"
                assert fs.cat_file(key) == (reference / row.name / f"{tile.stem}_instances.png").read_bytes()
        coco = json.loads(fs.cat_file("data/labels/coco.json"))
        names = {f"{row.name}/{tile.name}" for row in rows for tile in row.glob("c*.png")}
        assert len(coco["images"]) == inputs - 1 and all(i["file_name"] in names for i in coco["images"])  # under the prefix
        assert fs.exists("data/labels/review.parquet")
    finally:
        server.terminate()
        server.wait(10)


@pytest.mark.slow
def test_worker_node_lost_mid_run_the_job_finishes(cluster, tiles_and_reference):
    """Last of the cluster tests: it takes the worker node down (SIGKILL of its processes)."""
    folder, reference = tiles_and_reference
    out = folder / "node-lost"
    driver = ray_segment(folder, out, cluster["address"], "--actors", "2")
    wait_for_records(out, 30, driver)
    worker = cluster["nodes"]["worker"]
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    code, log = finish(driver)
    assert code == 1 and "1 input(s) failed" in log, log
    assert_exactly_once(out, CLUSTER_TILES + 1)
    assert_same_as(out, reference)
