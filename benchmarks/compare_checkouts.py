"""Speed of two checkouts side by side: `fcmae bench` of each, in alternating processes.

    python benchmarks/compare_checkouts.py /path/to/before /path/to/after --rounds 6 \\
        -- --model tiny --batch-size 8 --backends [sparse]

Each round runs `<checkout>/.venv/bin/fcmae bench ARGS --json FILE` once per checkout, the order
alternating between rounds, so both see the same machine load. Per process it takes the fastest
step (`step_s_min`: the least disturbed by other load on a shared machine) and the peak memory;
the table gives, per backend, the median over rounds of each, and the after/before speed ratio
(of medians, and the spread of per-round ratios). The last line is one JSON object.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def bench_once(checkout, args):
    exe = os.path.join(checkout, ".venv", "bin", "fcmae")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.json")
        subprocess.run([exe, "bench", *args, "--json", path], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        with open(path) as f:
            return json.load(f)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before", help="checkout with a .venv (the reference)")
    p.add_argument("after", help="checkout with a .venv")
    p.add_argument("--rounds", type=int, default=6)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args, bench_args = p.parse_args(argv[:split]), argv[split + 1:]  # after --: `fcmae bench` arguments
    runs = {"before": [], "after": []}
    for r in range(args.rounds):
        order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
        for name in order:
            runs[name].append(bench_once(getattr(args, name), bench_args))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{name} {row['backend']} {row['step_s_min']:.3f}s" for name in order for row in runs[name][-1]["results"]),
            file=sys.stderr, flush=True)
    summary = []
    first = runs["before"][0]
    for row in first["results"]:
        key = (row["backend"], row["mask_ratio"])

        def values(name, field):
            return [next(x[field] for x in run["results"] if (x["backend"], x["mask_ratio"]) == key)
                    for run in runs[name]]

        before, after = values("before", "step_s_min"), values("after", "step_s_min")
        ratios = [b / a for b, a in zip(before, after)]
        mem_b, mem_a = values("before", "peak_memory_mb"), values("after", "peak_memory_mb")
        summary.append({
            "backend": key[0], "mask_ratio": key[1],
            "before_img_s": first["batch_size"] / statistics.median(before),
            "after_img_s": first["batch_size"] / statistics.median(after),
            "speedup": statistics.median(before) / statistics.median(after),
            "speedup_per_round_min": min(ratios), "speedup_per_round_max": max(ratios),
            "before_peak_mb": None if None in mem_b else statistics.median(mem_b),
            "after_peak_mb": None if None in mem_a else statistics.median(mem_a),
        })
    print(f"{first['model']} {first['input_size']}px batch {first['batch_size']} {first['precision']}, "
          f"{first['threads']} threads, {args.rounds} alternating rounds; per process its fastest step")
    print(f"{'backend':<10} {'before img/s':>12} {'after img/s':>12} {'speed-up':>9} {'(rounds)':>13} "
          f"{'before MB':>10} {'after MB':>9}")
    for s in summary:
        mb = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
        print(f"{s['backend']:<10} {s['before_img_s']:>12.2f} {s['after_img_s']:>12.2f} {s['speedup']:>8.2f}x "
              f"{s['speedup_per_round_min']:>6.2f}-{s['speedup_per_round_max']:.2f} "
              f"{mb(s['before_peak_mb']):>10} {mb(s['after_peak_mb']):>9}")
    print(json.dumps({"bench_args": bench_args, "rounds": args.rounds, "results": summary}, separators=(",", ":")))


if __name__ == "__main__":
    main()
