"""Segments on request: latency of one request and throughput of the served MLflow model.

    python bench/serve.py [--users 400] [--requests 200] [--workers 2]

1. generates ``--users`` users' events and makes a model run with ``tracking.mlflow`` on (it
   registers ``seqclust_segments``), then ``seqclust promote --alias champion``;
2. starts ``mlflow models serve -m models:/seqclust_segments@champion`` (``--workers``
   uvicorn workers) and waits for ``/ping``;
3. builds two requests from the run's own users: one user with 20 events and one with 200
   (a user's events, repeated a day later as often as needed);
4. times ``--requests`` requests of each, one after the other, through the server (HTTP, JSON
   ``dataframe_records``) and through the loaded model's ``predict`` in this process, and
   Keras' own ``model.predict`` on the same sessions' features (the encoder alone: what the
   model adds is validation, sessionization, tokens and placement);
5. runs 4 client threads sending 20-event users to the server for ``--seconds`` seconds.

Figures: p50 / p99 milliseconds per request; users per second at concurrency 4; in-process
predict over raw Keras predict (p50 over p50, 200-event user; Keras' ``predict`` has a large
fixed cost per call, so the encoder's own compiled forward pass is timed too, for scale).
JSON last line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
MODEL = [
    "encoder.epochs=3",
    "encoder.train_sample=5000",
    "cluster.n_init=1",
    "cluster.fine_k=null",
    "evaluate.downstream=false",
    "baseline.bag_of_events=false",
    "tracking.mlflow=true",
]


def _seqclust(*args: str) -> None:
    cmd = [sys.executable, "-m", "seqclust.app.cli", *args]
    if args[0] != "generate":
        cmd += ["--conf", str(REPO / "conf" / "local.yaml")]
    if args[0] == "run":
        cmd += [x for s in MODEL for x in ("--set", s)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: bytes) -> float:
    t0 = time.perf_counter()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        r.read()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}")
    return (time.perf_counter() - t0) * 1000


def _user_with(events: pd.DataFrame, n: int, uid: str) -> pd.DataFrame:
    """``n`` events of one user: the busiest user's, repeated a day later as often as needed."""
    busiest = events["user_id"].value_counts().index[0]
    mine = events[events["user_id"] == busiest].sort_values("ts")
    parts, k = [], 0
    while sum(len(p) for p in parts) < n:
        parts.append(mine.assign(ts=mine["ts"] + pd.Timedelta(days=k)))
        k += 1
    out = pd.concat(parts).head(n).assign(user_id=uid)
    return out.assign(ts=out["ts"].dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))


def _ms(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs)
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=400)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="seqclust-serve-bench-"))
    out = work / "out"
    _seqclust("generate", "--out", str(work / "gen"), "--users", str(args.users))
    t0 = time.time()
    _seqclust("run", "--input", str(work / "gen" / "events"), "--output", str(out), "--run-id", "m1")
    _seqclust("promote", "--run-id", "m1", "--output", str(out))
    print(f"model run and registration: {time.time() - t0:.0f} s", file=sys.stderr)
    uri = f"sqlite:///{out / '_mlflow' / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    port = _port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_MODELS_WORKERS": str(args.workers),
    }
    log = open(work / "server.log", "w")  # noqa: SIM115 - closed at the end
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/seqclust_segments@champion", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", str(args.workers)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                    break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit((work / "server.log").read_text()[-3000:]) from None
                time.sleep(1)
        import mlflow.pyfunc

        from seqclust.represent.encoder import build_encoder
        from seqclust.represent.features import featurize, input_columns
        from seqclust.serve.request import validate_events

        events = pd.read_parquet(work / "gen" / "events")
        reqs = {n: _user_with(events, n, f"bench-{n}") for n in (20, 200)}
        model = mlflow.pyfunc.load_model("models:/seqclust_segments@champion")
        seg = model.unwrap_python_model().segmenter
        raw = build_encoder(seg.artifact.model_cfg)
        raw.set_weights(seg.artifact.weights)
        figures: dict[str, float] = {}
        for n, frame in reqs.items():
            body = json.dumps({"dataframe_records": json.loads(frame.to_json(orient="records"))}).encode()
            for _ in range(5):  # warm: the first calls build TensorFlow's graphs
                _post(port, body)
                model.predict(frame)
            http = [_post(port, body) for _ in range(args.requests)]
            local = []
            for _ in range(args.requests):
                t = time.perf_counter()
                model.predict(frame)
                local.append((time.perf_counter() - t) * 1000)
            # the same sessions' features, through Keras' own predict
            from seqclust.sessionize.arrow_engine import sessionize_table

            clean, _ = validate_events(frame, seg.source, pd.Timestamp.now(tz="UTC").to_pydatetime())
            sess = sessionize_table(clean, seg.sessionize)
            feats = featurize(sess.select(input_columns(sess.column_names, seg.artifact.vocab.token_fields)), seg.artifact.vocab)
            for _ in range(5):
                raw.predict(feats, verbose=0)
            keras = []
            for _ in range(args.requests):
                t = time.perf_counter()
                raw.predict(feats, verbose=0)
                keras.append((time.perf_counter() - t) * 1000)
            forward = []  # the encoder's own compiled forward pass (what the model calls), for scale
            for _ in range(args.requests):
                t = time.perf_counter()
                seg._predict(feats)
                forward.append((time.perf_counter() - t) * 1000)
            for name, xs in (("http", http), ("predict", local), ("raw_keras", keras), ("encoder_forward", forward)):
                p50, p99 = _ms(xs)
                figures[f"p50_ms_{n}_events_{name}"], figures[f"p99_ms_{n}_events_{name}"] = round(p50, 2), round(p99, 2)
            print(f"{n} events ({sess.num_rows} sessions): HTTP p50 {_ms(http)[0]:.1f} ms p99 {_ms(http)[1]:.1f} ms; "
                  f"predict p50 {_ms(local)[0]:.1f} ms; raw Keras predict p50 {_ms(keras)[0]:.1f} ms", file=sys.stderr)  # fmt: skip
        body20 = json.dumps({"dataframe_records": json.loads(reqs[20].to_json(orient="records"))}).encode()
        done, stop = [0] * 4, time.time() + args.seconds

        def client(i: int) -> None:
            while time.time() < stop:
                _post(port, body20)
                done[i] += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        t0 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rate = sum(done) / (time.time() - t0)
        print(f"concurrency 4: {rate:.0f} users/s ({args.workers} server workers)", file=sys.stderr)
        result = {
            "bench": "serve",
            "users": args.users,
            "workers": args.workers,
            "requests": args.requests,
            **figures,
            "p99_ms_200_events": figures["p99_ms_200_events_http"],
            "p50_ms_20_events": figures["p50_ms_20_events_http"],
            "users_per_s_concurrency_4": round(rate, 1),
            "predict_over_raw_keras": round(figures["p50_ms_200_events_predict"] / figures["p50_ms_200_events_raw_keras"], 3),
        }
        print(json.dumps(result))
    finally:
        server.terminate()
        server.wait(30)
        log.close()


if __name__ == "__main__":
    main()
