"""``make bench``: every benchmark in one go, tables printed and written to benchmarks/results.md."""

from __future__ import annotations

import contextlib
import io
import sys
import time

import bench_bias_update
import bench_router
import bench_train_step

try:
    import bench_moe_layer
except ImportError:  # pragma: no cover
    bench_moe_layer = None


def main() -> int:
    out = io.StringIO()
    start = time.time()
    steps = [("router", bench_router.main, ["--quick"] if "--quick" in sys.argv else []),
             ("bias update", bench_bias_update.main, []),
             ("training step", bench_train_step.main, [])]
    if bench_moe_layer is not None:
        steps.insert(2, ("MoE layer", bench_moe_layer.main, []))
    for name, fn, args in steps:
        print(f"== {name} ==", flush=True)
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            fn(args)
        print(buffer.getvalue(), flush=True)
        out.write(buffer.getvalue() + "\n")
    with open("results.md", "w") as fh:
        fh.write(out.getvalue())
    print(f"all benchmarks: {time.time() - start:.0f} s; tables in benchmarks/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
