"""A Faust-style app in Weir: counts kept in tables, a join of two streams, values read back
by key while (and after) it runs.

In Faust one writes an agent over a topic and a ``Table``::

    views = app.Table("views", default=int)

    @app.agent(page_view_topic)
    async def count(events):
        async for v in events:
            views[v.page] += 1

Weir declares the same as a ``table`` step: a key and running aggregates (or the latest row).
The table is checkpointed with the rest of the job, split over the workers by key, emits its
changes to any sink (an upsert sink keeps one row per key), and answers ``GET
/tables/<id>/<key>`` on the API port, or ``Pipeline.table_value`` in Python.

This app reads page views and a changelog of users (each row a user's new country), joins
each view with the country its user had *at the time of the view* (a temporal join), and
keeps two tables: views per page, and views and the latest view time per country.

    python examples/python/page_views.py OUT_DIR [--views N] [--workers W]
"""

import argparse
import json
import os
import random
import sys
from typing import Dict, List, Optional, Tuple

import weir

VIEW = {"fields": [{"name": "user_id", "type": "string"}, {"name": "page", "type": "string"},
                   {"name": "ts", "type": "int64"}]}
USER = {"fields": [{"name": "user_id", "type": "string"}, {"name": "country", "type": "string"},
                   {"name": "ts", "type": "int64"}]}
PAGES = ["/", "/pricing", "/docs", "/blog", "/signup"]
COUNTRIES = ["de", "fr", "jp", "br", "us"]


def make_input(out_dir: str, views: int = 5000, users: int = 40, seed: int = 7) -> Tuple[str, str]:
    """Writes ``views.jsonl`` (a view every 10 ms, a little out of order) and ``users.jsonl``
    (each user's country, changing now and then) and returns their paths."""
    rng = random.Random(seed)
    t0 = 1_700_000_000_000
    view_rows = []
    for i in range(views):
        ts = t0 + i * 10 - rng.randrange(0, 300)
        view_rows.append({"user_id": f"u{rng.randrange(users)}", "page": rng.choice(PAGES), "ts": ts})
    user_rows = []
    for i in range(views // 10):
        user_rows.append({"user_id": f"u{rng.randrange(users)}", "country": rng.choice(COUNTRIES),
                          "ts": t0 + i * 100 - rng.randrange(0, 300)})
    paths = []
    for name, rows in (("views.jsonl", view_rows), ("users.jsonl", user_rows)):
        path = os.path.join(out_dir, name)
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        paths.append(path)
    return paths[0], paths[1]


def pipeline(views_path: str, users_path: str, out_dir: str) -> weir.Pipeline:
    p = weir.Pipeline("page-views")
    p.add_source("views", weir.file(views_path), schema=VIEW, event_time="ts", max_out_of_orderness="1s")
    p.add_source("users", weir.file(users_path), schema=USER, event_time="ts", max_out_of_orderness="1s")
    # views[page] += 1
    p.table("views_per_page", "page", aggregates={"views": "count()"}).input("views")
    # Each view with its user's country at the time of the view (None before the first).
    p.temporal_join("with_country", "views", "users", on="user_id", kind="left", names=("view", "profile"))
    p.select("flat", ["view.page AS page", "profile.country AS country", "view.ts AS ts"])
    p.table("views_per_country", "country", aggregates={"views": "count()", "last_view": "max(ts)"})
    # Every change of each table, as a change log (an upsert sink would keep one row per key).
    p.add_sink("page-changes", weir.file_sink(os.path.join(out_dir, "views_per_page.jsonl")), input="views_per_page")
    p.add_sink("country-changes", weir.file_sink(os.path.join(out_dir, "views_per_country.jsonl")),
               input="views_per_country")
    p.dead_letters(os.path.join(out_dir, "dead_letters.jsonl"))
    return p


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--views", type=int, default=5000)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    views, users = make_input(args.out_dir, args.views)
    p = pipeline(views, users, args.out_dir)
    summary = p.run(workers=args.workers)
    print(f"{summary.source_records} events in")
    by_page: Dict[str, int] = {r["page"]: r["views"] for r in p.table_rows("views_per_page")}
    for page, n in sorted(by_page.items(), key=lambda kv: -kv[1]):
        print(f"  {page:10} {n:6} views")
    de = p.table_value("views_per_country", "de")
    print(f"  views from de: {de['views'] if de else 0}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
