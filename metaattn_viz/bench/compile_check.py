"""Every Triton launch of the routed model, compiled for the GPUs it may meet, on a machine
without one (`python -m metaattn_viz.bench.compile_check`).

The GPU check (scripts/device_check.sh) needs a CUDA machine, and this project's machines
seldom have one; the interpreter tests check the kernels' maths but never compile them. This
check compiles them: the launches the routed model makes on CUDA (`kernels/compile_only.py`
stands in for the driver, so the same launch code runs on CPU tensors and nothing executes)
for each compute capability of `metaattn_kernels.compile_only.MAX_SHARED`, each compute dtype
and each head layout below, and reports every launch's shared memory, registers and spills.
A launch that would not run on that GPU (a compilation error, too much shared memory, too
many registers for its threads) is reported. The exit code is 1 where one is a defect: a
build that fails for any other reason than shared memory, or the shipped model's layout
refused on any GPU. A layout of another model refused for shared memory (head dim 256 on
a T4) is what the routed model meets by keeping to the PyTorch path on that GPU
(metaattn_viz/routing/device.py, fit_backend), so it is reported, not failed.

The launches, per GPU, dtype, head layout and linear feature map, are those of
`metaattn_kernels.triton_probe.routed_launches`: a prefill (hard-routed rows of every expert
and hedged rows), one query row with a given linear state, and a decode step with its
weights on the device (the session's two CUDA paths, metaattn_viz/routing/session.py). The
kernels pick their pipeline stages as on a GPU (kernels/triton_launch.py), and the report
says which fitted.

Head layouts: SmolLM2-135M's (the shipped config, 9/3 heads of 64), the GPU check's tiny
model, a Llama-style 32/8 heads of 128 (what a researcher's own model may bring) and a
multi-query 16/1 of 64 (16 query heads per kv head: the widest packing of a decode step,
HG = 16) and Gemma 2 2B's 8/4 of 256 (the largest head dim a common model brings).

Nothing here times anything. The report says which triton compiled it: the GPU check's
machine and ZeroGPU run triton 3.6, this project pins a newer one (docs/benchmarks.md has
both runs).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict

# compute capability -> the GPUs of it that this project meets: Spaces' GPU hardware
# (docs/deploy.md), ZeroGPU's RTX Pro 6000 and the GPU check's H100 / H200
GPUS = {75: "T4", 80: "A100", 86: "A10G", 89: "L4, L40S", 90: "H100, H200", 120: "RTX Pro 6000 (ZeroGPU)"}
DTYPES = ("bfloat16", "float16", "float32")
LLAMA_D128 = (32, 8, 128)  # query heads, kv heads, head dim
MQA_16 = (16, 1, 64)
GEMMA_D256 = (8, 4, 256)  # Gemma 2 2B's: the largest head dim a common model brings
SHIPPED_LAYOUT = "smollm2-135m"  # the app's model: refused anywhere, it would lose its kernels
MAPS = ("elu", "learned")  # the linear expert's feature maps: elu + 1, or a learned map


def head_layouts() -> dict[str, tuple[int, int, int]]:
    """name -> (query heads, kv heads, head dim): the shipped SmolLM2 config's, the GPU
    check's tiny model's, a Llama-style one of head dim 128, a multi-query one and Gemma 2's
    of head dim 256."""
    from metaattn_viz.bench.gpu_check import _tiny_config
    from metaattn_viz.routing.loading import SMOLLM2_CONFIG

    smol = json.loads(SMOLLM2_CONFIG.read_text())
    tiny = _tiny_config()
    return {
        SHIPPED_LAYOUT: (smol["num_attention_heads"], smol["num_key_value_heads"], smol["head_dim"]),
        "gpu-check-tiny": (tiny.num_attention_heads, tiny.num_key_value_heads, tiny.head_dim),
        "llama-d128": LLAMA_D128,
        "mqa-16": MQA_16,
        "gemma-d256": GEMMA_D256,
    }


def _feature_map(hq: int, hkv: int, d: int):
    """A learned feature map of this layout with random weights (the linear kernels' MAPPED variant)."""
    import torch

    from metaattn_kernels.feature_maps import FeatureMap

    g = torch.Generator().manual_seed(1)
    return FeatureMap(
        torch.randn(hq, d, d // 2, generator=g),
        torch.randn(hq, d // 2, generator=g),
        torch.randn(hkv, d, d // 2, generator=g),
        torch.randn(hkv, d // 2, generator=g),
    )


def check(
    archs: list[int],
    dtypes: list[str],
    layouts: dict[str, tuple[int, int, int]],
    maps: tuple[str, ...] = MAPS,
    on_result: Callable[[dict], None] | None = None,
) -> list[dict]:
    """One result per (arch, dtype, layout, linear map): its launches, or the error that
    stopped them."""
    import torch

    from metaattn_kernels.compile_only import MAX_SHARED, compile_only
    from metaattn_kernels.triton_probe import routed_launches
    from metaattn_viz.core.settings import DEFAULTS

    results = []
    for arch, dtype, (name, layout), linear_map in itertools.product(archs, dtypes, layouts.items(), maps):
        t0 = time.perf_counter()
        res: dict = {"arch": arch, "gpu": GPUS[arch], "dtype": dtype, "layout": name, "map": linear_map}
        fm = _feature_map(*layout) if linear_map == "learned" else None
        with compile_only(arch) as launches:
            try:
                routed_launches(
                    *layout,
                    getattr(torch, dtype),
                    torch.device("cpu"),
                    window=DEFAULTS.window,
                    n_sink=DEFAULTS.n_sink,
                    feature_map=fm,
                )
                res["ok"] = True
            except Exception as e:  # a launch that would fail on this GPU: reported
                res["ok"], res["error"] = False, f"{type(e).__name__}: {str(e).strip()[:500]}"
        res["launches"] = [asdict(x) for x in launches]
        res["max_shared"] = MAX_SHARED[arch]
        res["seconds"] = round(time.perf_counter() - t0, 2)
        results.append(res)
        if on_result is not None:
            on_result(res)
    return results


def is_defect(res: dict) -> bool:
    """A failed result the routed model does not meet by keeping to the PyTorch path (module
    docstring): any error but a shared-memory refusal, or any failure of SHIPPED_LAYOUT."""
    if res["ok"]:
        return False
    return res["layout"] == SHIPPED_LAYOUT or not res["error"].startswith("OutOfResources")


def markdown_table(results: list[dict]) -> str:
    """A GPU x (layout, dtype) table of the results, both linear maps in a cell: "ok" (3
    pipeline stages), "ok, 2 stages" / "ok, 1 stage" where fewer fitted (the least any
    launch took), with ", smaller linear tiles" where the routed linear kernel took its
    smaller plan (kernels/triton_routed.py), or "no: N KiB" (the shared memory the first
    refused launch asked for)."""
    cols = list(dict.fromkeys((r["layout"], r["dtype"]) for r in results))
    archs = list(dict.fromkeys(r["arch"] for r in results))
    lines = [
        "| GPU | " + " | ".join(f"{lay}, {dt}" for lay, dt in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for arch in archs:
        cells = []
        for col in cols:
            group = [r for r in results if r["arch"] == arch and (r["layout"], r["dtype"]) == col]
            bad = [r for r in group if not r["ok"]]
            if not group:  # not asked for on this GPU
                cells.append("not compiled")
                continue
            if bad:
                asked = re.search(r"Required: (\d+)", bad[0]["error"])
                cells.append(f"no: {int(asked.group(1)) // 1024} KiB" if asked else "no")
                continue
            least = min((x["num_stages"] for r in group for x in r["launches"]), default=3)
            cell = "ok" if least == 3 else f"ok, {least} stage{'s' if least > 1 else ''}"
            if any(_split_columns(x) for r in group for x in r["launches"]):
                cell += ", smaller linear tiles"
            cells.append(cell)
        lines.append(f"| sm_{arch} ({GPUS[arch]}, {_shared_kib(arch)} KiB) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _split_columns(launch: dict) -> bool:
    """Whether a launch is the routed linear kernel's smaller plan: its grid has more than
    one block of output columns (a third axis above 1)."""
    grid = launch.get("grid") or (1, 1, 1)
    return launch.get("kernel") == "routed_linear_kernel" and len(grid) > 2 and grid[2] > 1


def _shared_kib(arch: int) -> int:
    from metaattn_kernels.compile_only import MAX_SHARED

    return MAX_SHARED[arch] // 1024


def summary_line(res: dict) -> str:
    """One line per result: the launches' largest shared memory, registers and spills."""
    ls = res["launches"]
    shared = max((x["shared"] for x in ls), default=0)
    regs = [x["regs"] for x in ls if x["regs"] is not None]
    spills = sum(x["spill_bytes"] or 0 for x in ls)
    stages = sorted({x["num_stages"] for x in ls})
    head = f"sm_{res['arch']} {res['dtype']:8s} {res['layout']:15s} {res['map']:7s}"
    if not res["ok"]:
        return f"{head} FAILED {res['error'].splitlines()[0]}"
    return (
        f"{head} ok  {len(ls)} launches, shared <= {shared // 1024} of {res['max_shared'] // 1024} KiB, "
        f"regs <= {max(regs) if regs else 'n/a'}, spills {spills} B, stages {'/'.join(map(str, stages))}"
    )


def _csv(text: str, cast=str) -> list:
    return [cast(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m metaattn_viz.bench.compile_check", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--arch", default=",".join(map(str, GPUS)), help="compute capabilities (default: all)")
    p.add_argument("--dtype", default=",".join(DTYPES), help="compute dtypes (default: all)")
    p.add_argument("--layout", default=None, help="head layouts by name (default: all)")
    p.add_argument("--map", default=",".join(MAPS), help="linear feature maps (default: both)")
    p.add_argument("--json", default=None, help="also write the results as JSON to this file")
    a = p.parse_args(argv)
    archs, dtypes, maps = _csv(a.arch, int), _csv(a.dtype), tuple(_csv(a.map))
    layouts = head_layouts()
    bad = (
        [f"--arch {x} (one of {list(GPUS)})" for x in archs if x not in GPUS]
        + [f"--dtype {x} (one of {list(DTYPES)})" for x in dtypes if x not in DTYPES]
        + [f"--map {x} (one of {list(MAPS)})" for x in maps if x not in MAPS]
    )
    if a.layout is not None:
        wanted = _csv(a.layout)
        bad += [f"--layout {x} (one of {list(layouts)})" for x in wanted if x not in layouts]
        layouts = {k: v for k, v in layouts.items() if k in wanted}
    if bad:
        print("compile_check: unknown " + "; ".join(bad), file=sys.stderr)
        return 2
    import triton

    from metaattn_kernels.checks import triton_interpreted

    if triton_interpreted():
        print("compile_check: unset TRITON_INTERPRET (the check compiles the kernels)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    results = check(archs, dtypes, layouts, maps, on_result=lambda r: print(summary_line(r), flush=True))
    failed = [r for r in results if not r["ok"]]
    defects = [r for r in failed if is_defect(r)]
    report = {
        "triton": triton.__version__,
        "python": platform.python_version(),
        "seconds": round(time.perf_counter() - t0, 1),
        "ok": not defects,
        "failed": len(failed),
        "defects": len(defects),
        "results": results,
    }
    n_ok = len(results) - len(failed)
    print(f"triton {triton.__version__}: {n_ok} of {len(results)} compiled ({report['seconds']} s)")
    print(markdown_table(results))
    if failed:
        print(
            f"{len(failed) - len(defects)} refused for shared memory where the routed model keeps to "
            f"the PyTorch path; {len(defects)} defects"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if not defects else 1


if __name__ == "__main__":
    sys.exit(main())
