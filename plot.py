"""Plot the curves of one or more runs from their metrics.jsonl (a tool beside the core; matplotlib is
the optional extra `plot`: pip install -e ".[plot]").

    python plot.py out/run                              # -> curves.png
    python plot.py out/run out/other --out cmp.png      # one colour per run
    python plot.py out/run --x tokens                   # against tokens trained instead of the step

Six panels: training and validation loss (a cross marks a skipped batch, a circle a hardware fault of
the spike guard), validation loss per source, learning rate, gradient norm, tokens/s and MFU. Only
metrics.jsonl is read, so this works while a run is going (a half-written last line is left out) and
on a laptop with a copied file. A resumed run logs the steps after its checkpoint again: the last
record of a step wins.
"""
import argparse
import json
import math
import os
import sys

PANELS = [("loss", "loss (val dashed)"), ("val_loss/", "validation loss per source"), ("lr", "learning rate"),
          ("grad_norm", "gradient norm"), ("tokens_per_sec", "tokens/s"), ("mfu", "MFU")]

def metrics_path(run):
    """A run directory's metrics.jsonl, or the file given."""
    return os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run

def read_metrics(run):
    """{step: record} of a run's metrics.jsonl."""
    records = {}
    with open(metrics_path(run)) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # the line the run is writing now
                continue
            records[r["step"]] = {**records.get(r["step"], {}), **r}
    return dict(sorted(records.items()))

def series(records, key, x):
    """(xs, ys) of the records that hold a finite number under `key`; x: "step" or "tokens" (every source's)."""
    xs, ys = [], []
    for step, r in records.items():
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(step if x == "step" else sum(n for k, n in r.items() if k.startswith("tokens/")))
            ys.append(v)
    return xs, ys

def draw(ax, xy, **style):
    if xy[0]:  # an empty line would still count as a line: the panel says "not logged" instead
        ax.plot(*xy, **style)

def plot(runs, out, x="step"):
    import matplotlib
    matplotlib.use("Agg")  # no display needed: a file is written
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        records, c, name = read_metrics(run), colours[i % len(colours)], os.path.basename(os.path.normpath(run))
        for ax, (key, title) in zip(axes.flat, PANELS):
            ax.set_title(title)
            ax.set_xlabel("tokens" if x == "tokens" else "step")
            if key == "val_loss/":  # one line style per source
                sources = sorted({k for r in records.values() for k in r if k.startswith(key)})
                for j, k in enumerate(sources):
                    draw(ax, series(records, k, x), color=c, marker="o", markersize=3,
                            linestyle=["-", "--", ":", "-."][j % 4], label=f"{name} {k[len(key):]}")
                continue
            kept = {s: r for s, r in records.items() if r.get("spike") != "data"}  # a skipped batch: its marker only
            draw(ax, series(kept if key == "loss" else records, key, x), color=c, linewidth=1, label=name)
            if key == "loss":
                draw(ax, series(records, "val_loss", x), color=c, linestyle="--", marker="o", markersize=3)
                for kind, marker in (("data", "x"), ("hardware", "o")):
                    spikes = {s: r for s, r in records.items() if r.get("spike") == kind}
                    draw(ax, series(spikes, "spike_loss", x), color=c, marker=marker, linestyle="none", fillstyle="none")
            if key == "grad_norm" and any(v > 0 for v in series(records, key, x)[1]):
                ax.set_yscale("log")
    for ax in axes.flat:
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)

def main(argv):
    p = argparse.ArgumentParser(description="Plot the curves of runs from their metrics.jsonl.")
    p.add_argument("runs", nargs="+", help="run directories (out_dir) or metrics.jsonl files")
    p.add_argument("--out", default="curves.png", help="the PNG to write (default: curves.png)")
    p.add_argument("--x", choices=("step", "tokens"), default="step", help="the x axis")
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print('error: plot.py needs matplotlib: pip install -e ".[plot]"', file=sys.stderr)
        return 2
    for path in map(metrics_path, args.runs):
        if not os.path.isfile(path):
            print(f"error: {path} not found (a run directory holds metrics.jsonl)", file=sys.stderr)
            return 2
    plot(args.runs, args.out, args.x)
    print(f"wrote {args.out}")
    return 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
