"""Generator throughput: events written per second (Parquet), goal >= 1M events per minute.

Usage: python bench/generate.py [--users N]. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from seqclust.datasets.generated import write_dataset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=40000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        r = write_dataset(d, args.users, seed=1, bad_rate=0.001)
        wall = time.perf_counter() - t0
    per_min = r.events / wall * 60
    print(f"generated {r.events} events for {r.users} users in {wall:.2f}s: {per_min / 1e6:.2f}M events/min (goal >= 1M)")
    print(
        json.dumps(
            {
                "events": r.events,
                "users": r.users,
                "wall_s": round(wall, 3),
                "events_per_min": round(per_min),
                "goal_events_per_min": 1_000_000,
            }
        )
    )


if __name__ == "__main__":
    main()
