#!/usr/bin/env python3
"""Turns bench/compare.sh's JSON runs into the table of docs/PERFORMANCE.md
and the data files that bench/throughput.gp and bench/latency.gp plot.

  compare_report.py --one RUN.json                 one-line summary of a run
  compare_report.py --median-rate RUNS_DIR SLUG    median bets/s of a mode's closed-loop runs
  compare_report.py --report OUT --machine M --config C --order "system|label|durability;..." [--na "label|why"]...
"""
import argparse
import glob
import json
import math
import os
import statistics
import sys


def load(path):
    with open(path) as f:
        return json.load(f)


def slug(label):
    return label.replace(" ", "_")


def closed_runs(runs_dir, label):
    return [load(p) for p in sorted(glob.glob(os.path.join(runs_dir, f"closed-{slug(label)}-*.json")))
            if os.path.getsize(p) > 0]


def one_line(run):
    cpu = run.get("server_cpu_s_per_million_bets", -1)
    errors = run.get("error_count", 0)
    return (f"{run['bets_per_s']:,.0f} bets/s, p99 {run['latency_us']['p99']:,.0f} us, "
            f"server cpu {cpu:.3f} s/M bets" + (f", {errors} errors" if errors else ""))


def median(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(values) if values else None


def fmt_rate(v):
    if v is None:
        return "n/a"
    return f"{v / 1e6:.2f} M" if v >= 1e6 else f"{v / 1e3:.0f} k"


def fmt_us(v):
    if v is None:
        return "n/a"
    return f"{v / 1000:.1f} ms" if v >= 10000 else f"{v:.0f} µs"


def fmt_ratio(v, ref, inverse=False):
    if v is None or ref is None or ref == 0 or v == 0:
        return "–"
    r = v / ref
    return f"{r:.2f}×"


def summarize(runs_dir, order):
    rows = []
    for entry in order:
        system, label, durability = entry.split("|")
        runs = closed_runs(runs_dir, label)
        open_path = os.path.join(runs_dir, f"open-{slug(label)}.json")
        open_run = load(open_path) if os.path.exists(open_path) and os.path.getsize(open_path) > 0 else None
        rates = [r["bets_per_s"] for r in runs]
        cpu = [r["server_cpu_s_per_million_bets"] for r in runs if r.get("server_cpu_s_per_million_bets", -1) > 0]
        # The latency distribution of the median run (by rate) stands for the mode.
        median_run = sorted(runs, key=lambda r: r["bets_per_s"])[len(runs) // 2] if runs else None
        rows.append({
            "system": system, "label": label, "durability": durability, "runs": len(runs),
            "rate": median(rates), "rate_min": min(rates) if rates else None, "rate_max": max(rates) if rates else None,
            "p99_closed": median([r["latency_us"]["p99"] for r in runs]),
            "p99_open": open_run["latency_us"]["p99"] if open_run else None,
            "open_rate": open_run["rate_target"] if open_run else None,
            "open_achieved": open_run["bets_per_s"] if open_run else None,
            "cpu": median(cpu),
            "errors": sum(r.get("error_count", 0) for r in runs) + (open_run.get("error_count", 0) if open_run else 0),
            "closed_percentiles": median_run["percentiles"] if median_run else [],
            "open_percentiles": open_run["percentiles"] if open_run else [],
        })
    return rows


def write_plot_data(out, rows):
    colours = {"sink": 1, "redis": 2, "lottery": 3}
    with open(os.path.join(out, "throughput.dat"), "w") as f:
        f.write("# label median_bets_per_s min max colour\n")
        for r in rows:
            if r["rate"] is None:
                continue
            f.write(f"\"{r['label']}\" {r['rate']:.0f} {r['rate_min']:.0f} {r['rate_max']:.0f} {colours[r['system']]}\n")
    # The latency chart shows the sink, every Redis mode and, per durability,
    # the fastest lottery-server mode: sixteen lines would be unreadable.
    # Colour says the system, the dash pattern the durability.
    chosen = []
    for r in rows:
        if r["system"] != "lottery":
            chosen.append(r)
    for durability in ("none", "group", "always"):
        c = [r for r in rows if r["system"] == "lottery" and r["durability"] == durability and r["rate"]]
        if c:
            chosen.append(max(c, key=lambda r: r["rate"]))
    colour = {"sink": "#707070", "redis": "#c0392b", "lottery": "#2e6fba"}
    dash = {"-": 1, "none": 1, "group": 2, "always": 3}
    counts = {}
    for kind in ("open", "closed"):
        styles = []
        with open(os.path.join(out, f"latency-{kind}.dat"), "w") as f:
            for r in chosen:
                points = [(p, v) for p, v in r[f"{kind}_percentiles"] if p < 100]
                if not points:
                    continue
                if styles:
                    f.write("\n\n")
                styles.append((colour[r["system"]], dash[r["durability"]]))
                f.write(f"\"{r['label']}\" \"latency_us\"\n")
                for p, v in points:
                    f.write(f"{1.0 / (1.0 - p / 100.0):.6g} {max(v, 0.5):.2f}\n")
        counts[kind] = styles
    with open(os.path.join(out, "latency-series.gp"), "w") as f:
        for kind, styles in counts.items():
            n = max(len(styles), 1)
            f.write(f"{kind}_series = {len(styles)}\n")
            f.write(f"array {kind}_colour[{n}] = [" + ", ".join(f'"{c}"' for c, _ in styles or [("#000000", 1)]) + "]\n")
            f.write(f"array {kind}_dash[{n}] = [" + ", ".join(str(d) for _, d in styles or [("#000000", 1)]) + "]\n")


def micro_rows(out):
    path = os.path.join(out, "runs", "micro.json")
    if not os.path.exists(path):
        return []
    try:
        data = load(path)
    except (json.JSONDecodeError, OSError):
        return []
    rows = []
    for b in data.get("benchmarks", []):
        rows.append({"name": b["name"], "bets_per_s": b.get("items_per_second"), "ns_per_bet": b.get("ns/bet"),
                     "bytes_per_s": b.get("bytes_per_second")})
    return rows


def allocations(out):
    path = os.path.join(out, "runs", "allocations.txt")
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return None
    fields = dict(kv.split("=") for kv in open(path).read().split())
    extra_bets = int(fields["bets_large"])
    extra_allocs = int(fields["allocations_after_large"]) - int(fields["allocations_after_small"])
    batch = int(fields.get("batch", "128"))
    return {"extra_bets": extra_bets, "extra_allocs": extra_allocs, "per_bet": extra_allocs / extra_bets,
            "per_batch": extra_allocs / (extra_bets / batch)}


def report(args):
    runs_dir = os.path.join(args.report, "runs")
    rows = summarize(runs_dir, args.order.split(";"))
    write_plot_data(args.report, rows)
    sink = next((r for r in rows if r["system"] == "sink"), None)
    redis = {r["durability"]: r for r in rows if r["system"] == "redis"}
    out = []
    out.append(f"Machine: {args.machine}  ")
    out.append(f"Load: {args.config}; bets/s and CPU are medians of the alternated closed-loop runs; "
               "the open-loop p99 is one run at half of the mode's median maximum.\n")
    out.append("| system / mode | bets/s | ×sink | ×Redis | p99 ack, max load | p99 ack, ½ load (open loop) "
               "| ×sink | ×Redis | server CPU s / M bets | ×sink | ×Redis | runs |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ref = redis.get(r["durability"]) if r["system"] == "lottery" else (redis.get("none") if r["system"] == "sink" else None)
        s = sink if r["system"] != "sink" else None
        cells = [
            r["label"], fmt_rate(r["rate"]),
            fmt_ratio(r["rate"], s["rate"]) if s else "–", fmt_ratio(r["rate"], ref["rate"]) if ref else "–",
            fmt_us(r["p99_closed"]), fmt_us(r["p99_open"]),
            fmt_ratio(r["p99_open"], s["p99_open"]) if s else "–",
            fmt_ratio(r["p99_open"], ref["p99_open"]) if ref else "–",
            f"{r['cpu']:.3f}" if r["cpu"] is not None else "n/a",
            fmt_ratio(r["cpu"], s["cpu"]) if s else "–", fmt_ratio(r["cpu"], ref["cpu"]) if ref else "–",
            str(r["runs"]) + (f" ({r['errors']} errors)" if r["errors"] else ""),
        ]
        out.append("| " + " | ".join(cells) + " |")
    for na in args.na or []:
        label, why = na.split("|", 1)
        out.append(f"| {label} | n/a ({why}) |" + " |" * 10)
    out.append("")
    out.append("Ratios: ×sink is the mode's figure over the discard sink's, ×Redis over the Redis mode of matching "
               "durability (none ↔ no persistence, group ↔ AOF everysec, always ↔ AOF always). For latency and "
               "CPU, lower is better.")

    micro = micro_rows(args.report)
    if micro:
        out.append("\nMicro-benchmarks (`lottery_bench`, one core, per bet of a 128-bet batch):\n")
        out.append("| benchmark | bets/s | ns/bet | MB/s |")
        out.append("|---|---:|---:|---:|")
        for m in micro:
            out.append(f"| {m['name']} | {fmt_rate(m['bets_per_s']) if m['bets_per_s'] else '–'} | "
                       f"{m['ns_per_bet']:.1f} | " if m["ns_per_bet"] else f"| {m['name']} | – | – | ")
            out[-1] += f"{m['bytes_per_s'] / 1e6:,.0f} |" if m["bytes_per_s"] else "– |"
    alloc = allocations(args.report)

    # The targets, checked against this run.
    out.append("\nTargets (issue 6), from this run:\n")
    lottery = [r for r in rows if r["system"] == "lottery" and r["rate"]]

    def best(durability):
        c = [r for r in lottery if r["durability"] == durability]
        return max(c, key=lambda r: r["rate"]) if c else None

    def verdict(ok):
        return "**holds**" if ok else "**does not hold**"

    none_best = best("none")
    if none_best and sink and sink["rate"]:
        x = none_best["rate"] / sink["rate"]
        out.append(f"- non-durable ingest ≥ 0.5× discard sink: {x:.2f}× ({none_best['label']}) — {verdict(x >= 0.5)}")
    if none_best and redis.get("none") and redis["none"]["rate"]:
        x = none_best["rate"] / redis["none"]["rate"]
        out.append(f"- non-durable ingest ≥ 4× Redis RPUSH without persistence: {x:.2f}× — {verdict(x >= 4)}")
    for durability, redis_mode, need in (("group", "everysec", 4), ("always", "always", 3)):
        b = best(durability)
        if b and redis.get(durability) and redis[durability]["rate"]:
            x = b["rate"] / redis[durability]["rate"]
            out.append(f"- {durability} commit ≥ {need}× Redis AOF {redis_mode}: {x:.2f}× ({b['label']}) — {verdict(x >= need)}")
        else:
            out.append(f"- {durability} commit ≥ {need}× Redis AOF {redis_mode}: n/a (no `--durability {durability}` yet)")
    opens = [r for r in lottery if r["durability"] == "none" and r["p99_open"] is not None]
    if opens:
        b = min(opens, key=lambda r: r["p99_open"])
        worst = max(opens, key=lambda r: r["p99_open"])
        out.append(f"- p99 ack < 200 µs at half load (open loop, non-durable): best {b['p99_open']:.0f} µs "
                   f"({b['label']}), worst {worst['p99_open']:.0f} µs ({worst['label']}) — {verdict(b['p99_open'] < 200)}")
    cpus = [r for r in lottery if r["cpu"]]
    if cpus:
        b = min(cpus, key=lambda r: r["cpu"])
        out.append(f"- ≥ 10 M bets per server CPU-second: {1 / b['cpu']:.1f} M ({b['label']}) — {verdict(1 / b['cpu'] >= 10)}")
    draw = next((m for m in micro if m["name"].startswith("draw/run_draw")), None)
    if draw and draw["bytes_per_s"]:
        gb = draw["bytes_per_s"] / 1e9
        out.append(f"- draw ≥ 1 GB/s per core: {gb:.2f} GB/s ({fmt_rate(draw['bets_per_s'])} bets/s) — {verdict(gb >= 1)}")
    if alloc:
        out.append(f"- no allocation per bet on the server: {alloc['extra_allocs']} allocations over "
                   f"{alloc['extra_bets']:,} more bets ({alloc['per_bet']:.2e} per bet, "
                   f"{alloc['per_batch']:.3f} per batch; server in its default mode) — "
                   f"{verdict(alloc['per_bet'] < 1e-3)}")
    perf = os.path.join(runs_dir, "perf-top.txt")
    if os.path.exists(perf):
        out.append("\nProfile of lottery-server under load (`perf record -g`, top symbols):\n")
        out.append("```")
        out.append(open(perf).read().rstrip())
        out.append("```")
    print("\n".join(out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--one")
    ap.add_argument("--median-rate", nargs=2)
    ap.add_argument("--report")
    ap.add_argument("--machine", default="")
    ap.add_argument("--config", default="")
    ap.add_argument("--order", default="")
    ap.add_argument("--na", action="append")
    args = ap.parse_args()
    if args.one:
        try:
            print(one_line(load(args.one)))
        except (OSError, json.JSONDecodeError, KeyError) as e:
            print(f"no result ({e})")
    elif args.median_rate:
        runs_dir, s = args.median_rate
        rates = [load(p)["bets_per_s"] for p in glob.glob(os.path.join(runs_dir, f"closed-{s}-*.json"))
                 if os.path.getsize(p) > 0]
        print(f"{median(rates) or 0:.0f}")
    elif args.report:
        report(args)
    else:
        ap.print_help()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
