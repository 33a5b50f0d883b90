"""Shared test helpers (imported by test modules; conftest.py keeps only fixtures): tiny
random causal LMs with untrained controllers, a byte-level tokenizer, attention inputs of
awkward sizes for the kernel tests, and a real app server in a subprocess."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from metaattn_kernels.dispatch import EXPERTS, routes_to_weights
from metaattn_kernels.feature_maps import FeatureMap

if TYPE_CHECKING:  # for annotations: the routed model is imported where one is built
    from metaattn_viz.routing.model import RoutedModel


def tiny_config(arch: str = "llama", **overrides):
    """A tiny random causal-LM config with RoPE and grouped-query attention."""
    import transformers

    common = dict(
        vocab_size=256,
        hidden_size=96,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "mistral":
        return transformers.MistralConfig(**{"sliding_window": None, **common})
    if arch == "phi3":
        common.pop("head_dim")
        return transformers.Phi3Config(
            **{"sliding_window": None, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **common}
        )
    if arch == "gemma2":
        return transformers.Gemma2Config(**common)
    if arch == "gpt2":
        return transformers.GPT2Config(
            vocab_size=common["vocab_size"],
            n_embd=common["hidden_size"],
            n_layer=common["num_hidden_layers"],
            n_head=common["num_attention_heads"],
            n_positions=common["max_position_embeddings"],
            bos_token_id=1,
            eos_token_id=2,
        )
    raise ValueError(arch)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32)
    return model.eval()


def tiny_llava(seed: int = 0):
    """A tiny vision-language model (LLaVA: a CLIP vision encoder and a tiny Llama), whose
    config holds its language model's config rather than a hidden_size of its own."""
    import torch
    import transformers

    vision = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
    )
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=tiny_config("llama"), image_token_index=255
    )
    torch.manual_seed(seed)
    return transformers.LlavaForConditionalGeneration(config).eval()


class CharTokenizer:
    """Enough of a tokenizer for tiny random models: ids are byte values."""

    eos_token_id = None
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids, skip_special_tokens=False):
        return bytes(int(i) % 256 for i in ids).decode("utf-8", "replace")


def routed_tiny(arch="llama", seed=0, spread=1.0, **overrides):
    """A tiny model with untrained controllers; spread > 1 makes their posteriors vary more
    from token to token (untrained ones sit near the prior)."""
    import torch

    from metaattn_viz.routing.controller import ControllerStack, config_for_model
    from metaattn_viz.routing.model import RoutedModel

    model = tiny_model(arch, seed=seed, **overrides)
    ctrl = {k: ControllerStack(config_for_model(model.config, k), seed=seed) for k in ("bayes", "priorfree")}
    with torch.no_grad():
        for stack in ctrl.values():
            for layer in stack.layers:
                layer.fc2.weight.mul_(spread)
    return RoutedModel(model, CharTokenizer(), ctrl, f"tiny-{arch}")


def random_maps(n_layers=3, hq=6, hkv=2, d=16, seed=0, spread=3.0) -> list[FeatureMap]:
    """Learned-looking maps for the tiny model (tiny_config): far from uniform features."""
    g = torch.Generator().manual_seed(seed)

    def one():
        return random_feature_map(hq, hkv, d, spread=spread, generator=g)

    return [one() for _ in range(n_layers)]


def routed_with_maps(maps, seed=1, spread=30.0) -> RoutedModel:
    """routed_tiny's model and controllers, with learned feature maps handed over."""
    from metaattn_viz.routing import linear_maps
    from metaattn_viz.routing.controller import KINDS, ControllerStack, config_for_model
    from metaattn_viz.routing.model import RoutedModel

    model = tiny_model(seed=seed)
    ctrl = {k: ControllerStack(config_for_model(model.config, k), seed=seed) for k in KINDS}
    with torch.no_grad():
        for stack in ctrl.values():
            for layer in stack.layers:
                layer.fc2.weight.mul_(spread)
    return RoutedModel(
        model, CharTokenizer(), ctrl, "tiny-llama", feature_maps=linear_maps.MapChoice(maps, "test")
    )


# Attention inputs for the kernel tests (reference, CPU and Triton backends)

TOL = 1e-4  # max abs error, float32


def make_qkv(b=2, hq=9, hkv=3, tq=17, tk=None, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    tk = tq if tk is None else tk
    q = torch.randn(b, hq, tq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, tk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, tk, d, generator=g).to(dtype)
    return q, k, v


def random_feature_map(hq=6, hkv=2, d=16, seed=0, spread=None, generator=None):
    """A learned feature map of random weights (metaattn_kernels.feature_maps.FeatureMap):
    projections [H, D, D/2] and biases [H, D/2] for the query and the key heads, drawn from
    ``generator`` (else one seeded with ``seed``); ``spread`` scales the projections by
    spread / sqrt(D), far from uniform features (None: unscaled)."""
    from metaattn_kernels.feature_maps import FeatureMap

    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    scale = 1.0 if spread is None else spread / d**0.5

    def proj(h):
        w = torch.randn(h, d, d // 2, generator=g)
        return w if spread is None else w * scale

    wq = proj(hq)
    bq = torch.randn(hq, d // 2, generator=g)
    wk = proj(hkv)
    bk = torch.randn(hkv, d // 2, generator=g)
    return FeatureMap(wq, bq, wk, bk)


HQ, HKV, D = 9, 3, 16  # random_map's heads (query, key/value) and head dimension


def random_map(hq=HQ, hkv=HKV, d=D, seed=0, spread=3.0) -> FeatureMap:
    """A learned-looking map: weights large enough that the features differ from uniform."""
    g = torch.Generator().manual_seed(seed)
    return FeatureMap(
        torch.randn(hq, d, d // 2, generator=g) * spread / d**0.5,
        torch.randn(hq, d // 2, generator=g),
        torch.randn(hkv, d, d // 2, generator=g) * spread / d**0.5,
        torch.randn(hkv, d // 2, generator=g),
    )


def make_weights(mix, b, t, seed=0):
    """Routing weights [B, T, 3]: 'full' / 'linear' / 'local' (all one expert), 'random'
    (one-hot, random experts), 'hedged' (a third of the rows soft over two or three experts)."""
    g = torch.Generator().manual_seed(seed + 1)
    if mix in EXPERTS:
        return routes_to_weights(torch.full((b, t), EXPERTS.index(mix)))
    w = routes_to_weights(torch.randint(0, 3, (b, t), generator=g))
    if mix == "hedged":
        soft = torch.rand(b, t, 3, generator=g)
        soft = soft * (torch.rand(b, t, 3, generator=g) > 0.3)  # some experts drop out of the hedge
        soft = soft / soft.sum(-1, keepdim=True).clamp_min(1e-9)
        hedge = (torch.rand(b, t, 1, generator=g) < 0.35) & (soft.sum(-1, keepdim=True) > 0)
        w = torch.where(hedge, soft, w)
    return w


MIXES = ["full", "linear", "local", "random", "hedged"]
SIZES = [(1, 1), (17, 17), (130, 130), (1, 40), (17, 130)]  # (Tq, Tk): prefill, decode, chunked prefill
WINDOWS = [(8, 0), (8, 4), (200, 4)]  # (window, n_sink): window < T and window >= T


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def tiny_corpus(tmp_path):
    """A WikiText-style file of 12 short articles of random words (12 > 10: the usual
    split holds one out), for runs of the research commands on tiny models."""
    words = "the cat sat on a mat and the dog ran far away from home".split()
    g = torch.Generator().manual_seed(0)
    arts = []
    for a in range(12):
        body = " ".join(words[int(i)] for i in torch.randint(0, len(words), (120,), generator=g))
        arts.append(f" = Article {a} = \n\n {body} \n")
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(arts))
    return path


# The command line in this process (tests of what it refuses before any work)


class Reached(Exception):
    """An expensive step was reached (not a ValueError: the CLI does not turn it into exit 2)."""


def cli_code(args) -> int:
    """The exit code of `metaattn-viz ARGS` run in this process (argparse exits, the
    handlers return)."""
    from metaattn_viz.cli import main

    try:
        return main(args)
    except SystemExit as exit_:
        return int(exit_.code or 0)


def cli_refused(args, capsys) -> str:
    """The one error line of a refused command line (asserting exit 2 and no traceback)."""
    assert cli_code(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


# A real app server in a subprocess (API and browser tests)

ROOT = Path(__file__).resolve().parent.parent
# One torch thread in the server and in the CLI: the same arithmetic order, so the same
# routes (and no oversubscription of the shared cores).
THREAD_ENV = {"OMP_NUM_THREADS": "1", "METAATTN_THREADS": "1", "MKL_NUM_THREADS": "1"}
PROMPT = "The capital of France is Paris. The capital of Italy is"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(tmp: Path) -> dict:
    env = dict(os.environ, **THREAD_ENV)
    env.update(
        HF_HUB_OFFLINE="1",
        GRADIO_ANALYTICS_ENABLED="False",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    env.pop("SPACE_ID", None)
    return env


# `serve(public=True)` (what `serve --public` calls) as a command line: a public server on
# 127.0.0.1, without SPACE_ID (which would also bind 0.0.0.0 and mark storage ephemeral).
PUBLIC_SERVE = (
    "import logging, sys; logging.basicConfig(level=logging.INFO); "
    "from metaattn_viz.app.server import serve; "
    "serve(port=int(sys.argv[1]), db=sys.argv[2], public=True)"
)


def pytest_in_fresh_interpreter(test_file: str, *args: str, timeout: float = 900) -> None:
    """Run `test_file` (with more pytest `args`) in a fresh process with TRITON_INTERPRET=1
    set from the start: the fallback of the Triton tests when triton was imported before
    this process could set it (Triton picks interpreter or compiler at import)."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, *args],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


class AppServer:
    """`python -m metaattn_viz serve --port N --db DB` in a subprocess, ready when /status
    says the model is loaded. Its log goes to a file, printed if it fails to start.
    `public=True` serves it as a public deployment (visitors apart, queue limits); `env`
    adds environment variables (e.g. METAATTN_SHARED_LOG=1)."""

    def __init__(
        self,
        tmp: Path,
        timeout: float = 240.0,
        public: bool = False,
        env: dict | None = None,
        args: list[str] | None = None,
        wait_for_model: bool = True,
    ):
        self.args = list(args or [])  # more `serve` arguments (not with public)
        self.wait_for_model = wait_for_model  # False: ready as soon as the page answers
        self.public = public
        self.extra_env = dict(env or {})
        self.tmp = Path(tmp)
        self.db = self.tmp / "routing.duckdb"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = self.tmp / "server.log"
        self.timeout = timeout
        self.proc = None

    def __enter__(self) -> AppServer:
        self._log = open(self.log_path, "wb")
        if self.public:
            cmd = [sys.executable, "-c", PUBLIC_SERVE, str(self.port), str(self.db)]
        else:
            cmd = [sys.executable, "-m", "metaattn_viz", "serve", "--port", str(self.port)]
            cmd += ["--db", str(self.db), *self.args]
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**base_env(self.tmp), **self.extra_env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "gradio_api/info", timeout=5) as r:
                    if r.status == 200 and (not self.wait_for_model or self.status().get("model_ready")):
                        return self
            except OSError:
                pass
            time.sleep(1.0)
        self.__exit__(None, None, None)
        raise RuntimeError(f"server not ready after {self.timeout} s:\n{self.log_tail()}")

    def status(self) -> dict:
        return self.client().predict(api_name="/status")

    def client(self):
        from gradio_client import Client

        return Client(self.url, verbose=False)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


# ---------------------------------------------------------------------------------------
# Routing traces for the store's tests: random but well-formed traces of any size, and
# traces that grow as the routed model's stream does. (Appended section: its imports
# live here so that other sections stay untouched.)
# ---------------------------------------------------------------------------------------
import numpy as np  # noqa: E402

from metaattn_viz.core.experts import COSTS, K  # noqa: E402
from metaattn_viz.core.settings import RoutingSettings  # noqa: E402
from metaattn_viz.core.trace import RoutingTrace  # noqa: E402


def empty_like(trace: RoutingTrace) -> RoutingTrace:
    """A trace with the same run fields as `trace` and no positions yet."""
    return RoutingTrace(
        model=trace.model,
        controller=trace.controller,
        controller_id=trace.controller_id,
        controller_trained=trace.controller_trained,
        settings=trace.settings,
        n_layers=trace.n_layers,
        head_dim=trace.head_dim,
        n_prompt_tokens=trace.n_prompt_tokens,
        truncated=trace.truncated,
        created_at=trace.created_at,
        prompt=trace.prompt,
        generation=trace.generation,
    )


def synthetic_trace(
    n_layers: int = 30,
    n_tokens: int = 100,
    seed: int = 0,
    controller: str = "bayes",
    budget: float | None = 0.5,
    n_prompt_tokens: int | None = None,
) -> RoutingTrace:
    """A random but well-formed trace: Dirichlet concentrations, routes that follow the
    posterior mean, some hedged decisions with mixed weights, costs, lambdas, odd tokens
    (empty, NUL, non-ASCII, special)."""
    rng = np.random.default_rng(seed)
    L, T = n_layers, n_tokens
    n_prompt = T // 4 if n_prompt_tokens is None else n_prompt_tokens
    trace = RoutingTrace(
        model="synthetic",
        controller=controller,
        controller_id=f"{controller}-synthetic-{seed}",
        controller_trained=seed % 2 == 0,
        settings=RoutingSettings(budget=budget, window=32, hedge_policy="soft", linear_map="elu"),
        n_layers=L,
        head_dim=64,
        n_prompt_tokens=n_prompt,
        truncated=seed % 3,
        prompt=f"synthetic prompt {seed} — ünïcode ✓",
        created_at=1.7e9 + seed * 3600.123456,
    )
    if controller == "priorfree":  # a point estimate: its "concentration" is a probability
        conc = rng.dirichlet(np.ones(K), size=(L, T)).astype(np.float32)  # [L, T, K]
    else:
        conc = rng.gamma(2.0, 1.5, size=(L, T, K)).astype(np.float32) + 0.05  # [L, T, K]
    routes = conc.argmax(-1).astype(np.int8)  # [L, T]
    hedged = rng.random((L, T)) < 0.1
    weights = np.eye(K, dtype=np.float32)[routes]  # [L, T, K]
    mean = conc / conc.sum(-1, keepdims=True)
    weights[hedged] = mean[hedged]
    cost = (weights * np.array(COSTS, np.float32)).sum(-1)  # [L, T]
    lam = rng.normal(0, 0.5, (L, T)).astype(np.float32)
    words = ["the", " cat", " ünï", "\n", " ", "", "✓", "\x00", "<|im_end|>", " sat"]
    tokens = [words[i % len(words)] + (str(i) if i % 7 == 0 else "") for i in range(T)]
    trace.extend(rng.integers(0, 49152, T), tokens, conc, routes, hedged, weights, cost, lam)
    trace.output_text = "".join(tokens[n_prompt:])
    trace.timings = {"prefill_ms": 12.5, "decode_ms": 100.0 + seed, "tokens_per_s": 70.0}
    return trace


def grow(full: RoutingTrace, chunks):
    """Yield a new trace that grows to `full` (prefill first, then by `chunks` sizes, an
    int or an iterable of ints), as the routed model's stream does."""
    trace = empty_like(full)
    sizes = iter(chunks) if not isinstance(chunks, int) else None
    pos = 0
    while pos < full.n_tokens:
        n = (
            full.n_prompt_tokens
            if pos == 0 and full.n_prompt_tokens
            else (chunks if sizes is None else next(sizes))
        )
        end = min(full.n_tokens, pos + max(1, int(n)))
        trace.extend(
            full.token_ids[pos:end],
            full.tokens[pos:end],
            full.concentration[:, pos:end],
            full.routes[:, pos:end],
            full.hedged[:, pos:end],
            full.weights[:, pos:end],
            full.cost[:, pos:end],
            full.lam[:, pos:end],
        )
        pos = end
        yield trace
    # what the model sets once the run is complete
    trace.output_text, trace.timings = full.output_text, dict(full.timings)
    trace.kl_to_dense = full.kl_to_dense


TRACE_ARRAYS = ("concentration", "routes", "hedged", "weights", "cost", "lam")


def assert_same_trace(got, want, n_tokens: int | None = None):
    """`got` equals `want` (its first n_tokens positions): every field a replay restores."""
    import pytest

    n = want.n_tokens if n_tokens is None else n_tokens
    for name in (
        "model",
        "controller",
        "controller_id",
        "controller_trained",
        "settings",
        "n_layers",
        "head_dim",
        "n_prompt_tokens",
        "truncated",
        "prompt",
    ):
        assert getattr(got, name) == getattr(want, name), name
    assert got.token_ids == want.token_ids[:n]
    assert got.tokens == want.tokens[:n]
    for name in TRACE_ARRAYS:
        a, b = getattr(got, name), getattr(want, name)[:, :n]
        assert a.dtype == b.dtype, name
        np.testing.assert_array_equal(a, b, err_msg=name)  # float32 exactly
    assert got.created_at == pytest.approx(want.created_at, abs=1e-6)
    if n_tokens is None:
        assert got.output_text == want.output_text
        assert got.timings == want.timings
        if want.kl_to_dense is None:
            assert got.kl_to_dense is None
        else:
            np.testing.assert_array_equal(got.kl_to_dense, want.kl_to_dense.astype(np.float32))


def stream_run(log, full, chunks=3, kind="generate"):
    """Stream `full` into the log as the app does: start, append as it grows, finish."""
    trace = None
    for trace in grow(full, chunks):
        if trace.run_id is None:
            log.start_run(trace, kind=kind)
        log.append(trace.run_id, trace)
    log.finish(trace.run_id, trace)
    return trace.run_id


def count(path_or_log, sql, **params):
    """The first value of `sql` on a routing log (a RunLog, or a file opened read-only)."""
    import duckdb

    from metaattn_viz.store import RunLog

    if isinstance(path_or_log, RunLog):
        return path_or_log.fresh_cursor().execute(sql, params).fetchone()[0]
    with duckdb.connect(str(path_or_log), read_only=True) as con:
        return con.execute(sql, params).fetchone()[0]


@contextlib.contextmanager
def writing_schema_version(monkeypatch, version: int):
    """This version's code writing a log of the older schema `version`: only the migrations
    up to it, and runs inserted without the columns added since (schema.RUNS_COLUMNS)."""
    from metaattn_viz.store import schema
    from metaattn_viz.store.queries import Q

    later = ", ".join(c.name for c in schema.RUNS_COLUMNS if c.since > version)
    with monkeypatch.context() as m:
        m.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:version])
        m.setattr(Q, "INSERT_RUNS", f"INSERT INTO runs BY NAME SELECT * EXCLUDE ({later}) FROM _new_runs")
        yield


class RefusingGPU:
    """A Triton kernel as a GPU with too little shared memory runs it: a launch whose
    constexprs `refuse` says are too large raises OutOfResources (what Triton raises before
    a real launch); the others run. Records each launch's (grid, constexprs, num_stages).
    With it, kernels/triton_launch.py's `smaller` plans run in Triton's interpreter, which
    has no shared memory of its own."""

    def __init__(self, kernel, refuse):
        self.kernel, self.refuse, self.launches = kernel, refuse, []

    def __getitem__(self, grid):
        from triton.runtime.errors import OutOfResources

        def run(*args, num_stages=None, **constexprs):
            self.launches.append((tuple(grid), dict(constexprs), num_stages))
            if self.refuse(constexprs):
                raise OutOfResources(98304, 65536, "shared memory")
            self.kernel[grid](*args, **constexprs)

        return run


def stand_in_gpu(monkeypatch) -> None:
    """kernels/triton_launch.py as on a GPU (its ladder of stages and plans) while the
    kernels run in the interpreter: used with RefusingGPU."""
    import metaattn_kernels.triton_launch as launching

    monkeypatch.setattr(launching, "triton_interpreted", lambda: False)
    monkeypatch.setattr(launching, "_device", lambda: "a GPU with 64 KiB per block")


# -- the page over a tiny model, its callbacks called directly (no browser) -------------------
from contextlib import contextmanager  # noqa: E402


@contextmanager
def tiny_page(folder: Path, spread: float = 1.0):
    """The page built over a tiny random routed model (`routed_tiny(spread=...)`) and a log
    and downloads under `folder`: its components by elem_id (`demo.components`); the engine
    closed after."""
    from metaattn_viz.app.engine import Engine
    from metaattn_viz.app.exports import Downloads
    from metaattn_viz.app.ui import build_app

    engine = Engine(routed=routed_tiny(spread=spread), db=str(folder / "log.duckdb"))
    try:
        demo = build_app(engine=engine, downloads=Downloads(folder / "dl"))
        demo.components = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
        yield demo
    finally:
        engine.close()


def callbacks(demo, name: str) -> list:
    """The page's event handlers named `name` (a callback's function name)."""
    return [d for d in demo.fns.values() if d.name == name]


def controls_at(demo, dep, trace=None, **values) -> dict:
    """The inputs of the page's event `dep` (a `callbacks` entry) at their start values; the
    routing controls and the controller at `trace`'s settings and the page's trace (a
    gr.State) `trace`, where given; then `values` by the controls' elem_ids or labels."""
    import gradio as gr

    c = demo.components
    data = {block: getattr(block, "value", None) for block in dep.inputs}
    if trace is not None:
        s = trace.settings
        by_label = {"Budget scope": s.scope, "Hedge policy": s.hedge_policy}
        by_block = {
            c["budget"]: s.budget,
            c["controller"]: trace.controller,
            c["hedge-measure"]: s.hedge_measure,
            c["cost-model"]: s.cost_model,
        }
        for block in dep.inputs:
            label = getattr(block, "label", "") or ""
            if block in by_block:
                data[block] = by_block[block]
            elif label.startswith("Hedge threshold"):
                data[block] = s.hedge_threshold
            elif label.startswith("Local window"):
                data[block] = float(s.window)
            elif label in by_label:
                data[block] = by_label[label]
            elif isinstance(block, gr.State):
                data[block] = trace  # the page's trace
    labelled = {getattr(b, "label", None): b for b in dep.inputs}
    for key, value in values.items():
        data[c.get(key) or labelled[key]] = value
    return data


# -- colour-vision deficiency: how far apart two colours look (the plots' tests) -------------

# Machado et al. (2009) simulation matrices at full severity (linear RGB)
CVD_SIMULATIONS = {
    "normal": np.eye(3),
    "protan": [
        [0.152286, 1.052583, -0.204868],
        [0.114503, 0.786281, 0.099216],
        [-0.003882, -0.048116, 1.051998],
    ],
    "deutan": [
        [0.367322, 0.860646, -0.227968],
        [0.280085, 0.672501, 0.047413],
        [-0.011820, 0.042940, 0.968881],
    ],
    "tritan": [
        [1.255528, -0.076749, -0.178779],
        [-0.078411, 0.930809, 0.147602],
        [0.004733, 0.691367, 0.303900],
    ],
}


def _linear(hexcol):
    c = np.array([int(hexcol[i : i + 2], 16) for i in (1, 3, 5)]) / 255
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _lab(rgb):
    xyz = (
        np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
        @ rgb
        / np.array([0.95047, 1.0, 1.08883])
    )
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def cvd_distance(a: str, b: str, vision: str) -> float:
    """CIE76 distance in Lab between two hex colours as seen under `vision`."""
    m = np.asarray(CVD_SIMULATIONS[vision])
    return float(np.linalg.norm(_lab(np.clip(m @ _linear(a), 0, 1)) - _lab(np.clip(m @ _linear(b), 0, 1))))
