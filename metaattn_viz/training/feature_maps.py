"""Learned feature maps for the linear expert: Hedgehog attention distillation
(docs/method.md, Experts; Zhang et al. 2024, "The Hedgehog & the Porcupine").

A softmax-pretrained model routed to the linear expert with phi = elu + 1 falls apart
(all-linear perplexity about 130 times dense), because elu + 1 weights keys nothing like
the softmax the model was trained with. Here each layer gets its own maps (one per query
head, one per kv head; the form is in metaattn_kernels.feature_maps), trained so that the
linear expert's attention weights match the frozen model's softmax weights:

    loss = mean_{heads, i} CE(A_i, Â_i),  A = causal softmax(q k^T * scaling),
    Â_ij = phi_q(q_i) . phi_k(k_j) / sum_{j' <= i} phi_q(q_i) . phi_k(k_j'),

on the post-RoPE q, k of the calibration split (the training articles of
metaattn_viz.training.data, as calibrate.py uses them). The model is frozen and run once:
every layer's q and k are captured by an attention function registered with transformers
under CAPTURE_NAME (plain SDPA otherwise), so routing/ is not involved; each layer is then
trained alone on its cached q, k (layers do not interact: the loss of layer l only reads
layer l's q, k, which do not depend on any map). Layer-by-layer is what makes this cheap.

Seeded per layer (seed + layer), deterministic with one torch thread; a checkpoint after
each layer lets a run resume (training/checkpoints.py: an unfinished run's checkpoint is
never overwritten without --resume). The result is a safetensors file and a meta.json
(every hyperparameter, the data file's SHA-256, the model's weights fingerprint, the
commit, the model slug, per-layer losses before and after, and elu + 1's loss for
comparison). `all_linear_perplexity` measures the model with every token of every layer
routed to the linear expert, with either map.

Command: python -m metaattn_viz.training.feature_maps --data corpus/wikitext2/wiki.dev.raw
Never: change the model's weights, import gradio or the store, or decide routes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from metaattn_viz import paths
from metaattn_viz.routing.fingerprint import FINGERPRINT_KIND, weights_fingerprint
from metaattn_viz.routing.generation import MAX_SEED
from metaattn_viz.routing.linear_maps import (  # the on-disk format: one definition
    META_FILE,
    TENSORS,
    MapsUnavailable,
    default_folder,
    load,
    load_meta,
    save,
)
from metaattn_viz.training import checkpoints
from metaattn_viz.training import data as data_mod
from metaattn_viz.training.checkpoints import CHECKPOINT
from metaattn_viz.training.evaluate import MIN_SEQ_LEN
from metaattn_viz.training.report import finite_or_null
from metaattn_viz.writable import output_problem

paths.ensure_kernels_importable()
from metaattn_kernels.dispatch import LINEAR, routed_attention  # noqa: E402
from metaattn_kernels.feature_maps import FeatureMap, hedgehog, input_scale, phi_key, phi_query  # noqa: E402

log = logging.getLogger(__name__)

CAPTURE_NAME = "metaattn_capture"  # transformers attention function that records q, k
LINEAR_NAME = "metaattn_all_linear"  # transformers attention function: every token linear


@dataclass
class FeatureMapConfig:
    steps: int = 600  # optimiser steps per layer
    batch_size: int = 4  # windows per step
    seq_len: int = 256
    train_windows: int = 64  # windows of the training articles whose q, k are cached
    val_windows: int = 4  # windows of the validation articles: the reported losses
    lr: float = 1e-2
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "train_windows", "val_windows"):
            # a window scores seq_len - 1 next-token predictions (perplexity needs one)
            v, least = getattr(self, name), MIN_SEQ_LEN if name == "seq_len" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ValueError(f"--{name.replace('_', '-')} must be a whole number >= {least}, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"--seed must be a whole number in [0, {MAX_SEED}], got {self.seed!r}")
        for name in ("lr", "weight_decay"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v!r}")
            # a plain float: a numpy one (from a notebook) in the checkpoint's config would
            # not load as plain data (checkpoints.read), and the run fail at its end
            object.__setattr__(self, name, v)


class LayerMaps(torch.nn.Module):
    """The trainable maps of one layer; `frozen()` gives the kernels' FeatureMap."""

    def __init__(self, hq: int, hkv: int, d: int, generator: torch.Generator | None = None):
        super().__init__()
        if d % 2:
            raise ValueError(f"head dim must be even for a Hedgehog map, got {d}")

        def init(h):  # orthonormal columns: at the start every feature sees a distinct direction
            w = torch.linalg.qr(torch.randn(h, d, d, generator=generator))[0][..., : d // 2]
            return torch.nn.Parameter(w.contiguous())

        self.q_weight, self.k_weight = init(hq), init(hkv)
        self.q_bias = torch.nn.Parameter(torch.zeros(hq, d // 2))
        self.k_bias = torch.nn.Parameter(torch.zeros(hkv, d // 2))

    def query(self, q: torch.Tensor) -> torch.Tensor:
        return hedgehog(q, self.q_weight, self.q_bias, input_scale(q.shape[-1]))

    def key(self, k: torch.Tensor) -> torch.Tensor:
        return hedgehog(k, self.k_weight, self.k_bias, input_scale(k.shape[-1]))

    def frozen(self) -> FeatureMap:
        return FeatureMap(
            *(p.detach().float().clone() for p in (self.q_weight, self.q_bias, self.k_weight, self.k_bias))
        )


def hedgehog_loss(
    pq: torch.Tensor, pk: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Mean cross-entropy between causal softmax attention (the teacher, from q, k) and the
    normalised linear attention weights of the features pq [B, Hq, T, F], pk [B, Hkv, T, F]."""
    hq, t = q.shape[1], q.shape[2]
    g = hq // k.shape[1]
    k, pk = k.repeat_interleave(g, dim=1), pk.repeat_interleave(g, dim=1)
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    with torch.no_grad():
        scores = (q.float() @ k.float().transpose(-1, -2)) * scaling
        teacher = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)  # [B, Hq, T, T]
    a = (pq @ pk.transpose(-1, -2)).masked_fill(~causal, 0.0)
    log_student = torch.log(a.clamp_min(1e-30)) - torch.log(a.sum(-1, keepdim=True))
    return -(teacher * log_student.masked_fill(~causal, 0.0)).sum(-1).mean()


def elu_loss(q, k, scaling) -> float:
    """The same loss with elu + 1 (the fixed map the learned one replaces)."""
    with torch.no_grad():
        return float(hedgehog_loss(phi_query(None, q.float()), phi_key(None, k.float()), q, k, scaling))


# -- capturing q, k and running all-linear, through transformers' attention interface --

_state: dict = {}


def _capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Records post-RoPE query/key of each layer, then plain causal SDPA."""
    _state["qk"][module.layer_idx].append((query.detach().clone(), key.detach().clone()))
    _state["scaling"] = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    o = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        is_causal=query.shape[2] > 1,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return o.transpose(1, 2).contiguous(), None


def _linear_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Every token of every layer routed to the linear expert (with the layer's learned map, if any)."""
    maps = _state["maps"]
    fm = None if maps is None else maps[module.layer_idx]
    w = torch.zeros(query.shape[0], query.shape[2], 3, dtype=query.dtype, device=query.device)
    w[..., LINEAR] = 1.0
    y, _ = routed_attention(
        query, key, value, w, window=64, n_sink=4, scale=scaling, backend=_state["backend"], feature_map=fm
    )
    return y.transpose(1, 2).contiguous(), None


def _run_with(model, name: str, fn, input_ids: torch.Tensor):
    from transformers import AttentionInterface

    AttentionInterface.register(name, fn)
    prev = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        with torch.no_grad():
            return model(input_ids=input_ids, use_cache=False).logits
    finally:
        model.set_attn_implementation(prev)


def capture_qk(model, input_ids: torch.Tensor, batch_size: int = 4):
    """Post-RoPE q [N, Hq, T, D] and k [N, Hkv, T, D] of every layer (a list), and the scaling."""
    n_layers = model.config.num_hidden_layers
    _state["qk"] = [[] for _ in range(n_layers)]
    try:
        for i in range(0, input_ids.shape[0], batch_size):
            _run_with(model, CAPTURE_NAME, _capture_attention, input_ids[i : i + batch_size])
        out = [(torch.cat([q for q, _ in qs]), torch.cat([k for _, k in qs])) for qs in _state["qk"]]
        return out, _state["scaling"]
    finally:
        _state.pop("qk", None)


def perplexity(
    model,
    input_ids: torch.Tensor,
    maps: list[FeatureMap] | None = None,
    *,
    all_linear: bool = True,
    backend: str = "cpu",
) -> float:
    """Perplexity of next-token prediction over windows input_ids [N, T]: dense (all_linear
    False), or with every token of every layer on the linear expert (maps None: elu + 1);
    infinite where it is too large for a float."""
    if input_ids.ndim != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < MIN_SEQ_LEN:
        raise ValueError(
            f"perplexity needs windows of at least {MIN_SEQ_LEN} tokens, got input_ids of shape "
            f"{tuple(input_ids.shape)}"
        )
    nll, count = 0.0, 0
    _state["maps"], _state["backend"] = maps, backend
    try:
        for i in range(input_ids.shape[0]):
            ids = input_ids[i : i + 1]
            if all_linear:
                logits = _run_with(model, LINEAR_NAME, _linear_attention, ids)
            else:
                with torch.no_grad():
                    logits = model(input_ids=ids, use_cache=False).logits
            lp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
            nll -= float(lp.gather(1, ids[0, 1:, None]).sum())
            count += ids.shape[1] - 1
    finally:
        _state.pop("maps", None)
    try:
        return math.exp(nll / count)
    except OverflowError:
        return math.inf


def all_linear_perplexity(
    model,
    tokenizer,
    data_path,
    maps: list[FeatureMap] | None,
    *,
    windows: int = 16,
    seq_len: int = 256,
    backend: str = "cpu",
    dense: float | None = None,
) -> dict:
    """Dense and all-linear perplexity on the first `windows` validation windows (the
    issue's 4,096 tokens by default): {"dense", "all_linear", "ratio", "tokens", ...}.
    `dense`: the dense perplexity of the same windows, if already measured."""
    split = data_mod.load_split(data_path)
    ids = data_mod.windows(tokenizer, split.validation, seq_len, "validation")[:windows]
    dense = perplexity(model, ids, all_linear=False) if dense is None else dense
    lin = perplexity(model, ids, maps, backend=backend)
    return {
        "dense": round(dense, 3),
        "all_linear": round(lin, 3),
        "ratio": round(lin / dense, 3),
        "tokens": int(ids.numel()),
        "windows": int(ids.shape[0]),
        "seq_len": seq_len,
    }


# -- training --


def train_layer(
    q: torch.Tensor, k: torch.Tensor, scaling: float, cfg: FeatureMapConfig, seed: int
) -> tuple[LayerMaps, list[float]]:
    """Train one layer's maps on its cached q [N, Hq, T, D], k [N, Hkv, T, D]; returns the
    maps and the training loss every 10 steps."""
    gen = torch.Generator().manual_seed(seed)
    maps = LayerMaps(q.shape[1], k.shape[1], q.shape[3], gen)
    opt = torch.optim.AdamW(maps.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))
    )
    curve = []
    n = q.shape[0]
    for step in range(cfg.steps):
        idx = torch.randperm(n, generator=gen)[: min(cfg.batch_size, n)]
        qb, kb = q[idx].float(), k[idx].float()
        loss = hedgehog_loss(maps.query(qb), maps.key(kb), qb, kb, scaling)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 10 == 0 or step + 1 == cfg.steps:
            curve.append(round(float(loss.detach()), 5))
    return maps, curve


def teacher_entropy(q, k, scaling) -> float:
    """Mean entropy of the causal softmax attention rows: the floor of the loss (a perfect student)."""
    hq, t = q.shape[1], q.shape[2]
    k = k.float().repeat_interleave(hq // k.shape[1], dim=1)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    with torch.no_grad():
        scores = ((q.float() @ k.transpose(-1, -2)) * scaling).masked_fill(~causal, float("-inf"))
        logp = torch.log_softmax(scores, dim=-1)
        return float(-(logp.exp() * logp.masked_fill(~causal, 0.0)).sum(-1).mean())


def eval_loss(maps: LayerMaps | None, q, k, scaling) -> float:
    """The Hedgehog loss of `maps` (None: elu + 1) on q, k, without gradients."""
    if maps is None:
        return elu_loss(q, k, scaling)
    with torch.no_grad():
        return float(hedgehog_loss(maps.query(q.float()), maps.key(k.float()), q, k, scaling))


def train(
    model,
    tokenizer,
    data_path,
    cfg: FeatureMapConfig,
    out_dir: Path,
    *,
    model_slug: str,
    model_name: str = "",
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Distil every layer's feature maps; saves them (safetensors + meta.json) to out_dir and
    returns the meta. A checkpoint after each layer; `resume` continues from it (one made on
    other settings, data or weights is refused), and without it a checkpoint in out_dir of
    a run that has not finished is refused (training/checkpoints.py, `all_layers_done`)."""
    split = data_mod.load_split(data_path)  # data problems surface here, before model work
    out_dir = Path(out_dir)
    # before any work: an unfinished run is refused
    resume_from = checkpoints.start(out_dir, resume, all_layers_done(out_dir, model.config.num_hidden_layers))
    train_ids = data_mod.windows(tokenizer, split.train, cfg.seq_len, "training")
    order = torch.randperm(train_ids.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
    train_ids = train_ids[order[: cfg.train_windows]]
    val_ids = data_mod.windows(tokenizer, split.validation, cfg.seq_len, "validation")[: cfg.val_windows]
    ckpt_path = out_dir / CHECKPOINT
    done: list[dict] = []
    states: list[dict] = []
    fingerprint = weights_fingerprint(model)  # which copy of the weights the maps are distilled from
    if resume_from is not None:
        # its states are used on the CPU, where LayerMaps trains: saved on CUDA, read anywhere
        ckpt = checkpoints.read(resume_from, ("config", "layers", "states"), map_location="cpu", resume=True)
        if "data_sha256" not in ckpt and "sha256" in ckpt:  # older checkpoints' name for it
            ckpt["data_sha256"] = ckpt["sha256"]
        checkpoints.check_resumable(ckpt_path, ckpt, ckpt["config"], asdict(cfg), split, fingerprint)
        done, states = ckpt["layers"], ckpt["states"]
        log.info("resuming after layer %d (%s)", len(done), ckpt_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in model.parameters():
        p.requires_grad_(False)
    t0 = time.perf_counter()
    qk_train, scaling = capture_qk(model, train_ids)
    qk_val, _ = capture_qk(model, val_ids)
    log.info("captured q, k of %d layers in %.1f s", len(qk_train), time.perf_counter() - t0)
    n_layers = len(qk_train)
    for layer in range(len(done), n_layers):
        t1 = time.perf_counter()
        q, k = qk_train[layer]
        qv, kv = qk_val[layer]
        torch.manual_seed(cfg.seed + layer)
        maps, curve = train_layer(q, k, scaling, cfg, cfg.seed + layer)
        row = {
            "layer": layer,
            "val_teacher_entropy": round(teacher_entropy(qv, kv, scaling), 5),
            "val_loss_elu": round(eval_loss(None, qv, kv, scaling), 5),
            "val_loss_learned": round(eval_loss(maps, qv, kv, scaling), 5),
            "train_loss_first": curve[0],
            "train_loss_last": curve[-1],
            "curve_every_10": curve,
            "seconds": round(time.perf_counter() - t1, 1),
        }
        done.append(row)
        states.append({k: v.detach().clone() for k, v in maps.state_dict().items()})
        checkpoints.write(
            ckpt_path,
            {
                "config": asdict(cfg),
                "data_sha256": split.sha256,
                "weights_fingerprint": fingerprint,
                "layers": done,
                "states": states,
            },
        )
        if progress:
            log.info(
                "layer %d: val loss elu+1 %.4f -> learned %.4f (%.1f s)",
                layer,
                row["val_loss_elu"],
                row["val_loss_learned"],
                row["seconds"],
            )
    from metaattn_viz.training.provenance import git_commit

    cfg_model = model.config
    meta = {
        "kind": "hedgehog",
        "form": "phi(x) = [softmax(x D^-1/4 W + b), softmax(-(x D^-1/4 W + b))], W [D, D/2] per head",
        "model": model_name,
        "model_slug": model_slug,
        "weights_fingerprint": fingerprint,
        "weights_fingerprint_kind": FINGERPRINT_KIND,
        "layers": n_layers,
        "q_heads": int(cfg_model.num_attention_heads),
        "kv_heads": int(cfg_model.num_key_value_heads),
        "head_dim": int(qk_train[0][0].shape[-1]),
        "hyperparameters": asdict(cfg),
        "data": split.describe(),
        "loss": "mean cross-entropy(causal softmax attention, normalised linear attention), per layer",
        "per_layer": done,
        "mean_val_loss_elu": round(sum(r["val_loss_elu"] for r in done) / n_layers, 5),
        "mean_val_loss_learned": round(sum(r["val_loss_learned"] for r in done) / n_layers, 5),
        "mean_val_teacher_entropy": round(sum(r["val_teacher_entropy"] for r in done) / n_layers, 5),
        "train_seconds_this_run": round(time.perf_counter() - t0, 1),
        "project_commit": git_commit(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch_threads": torch.get_num_threads(),
    }
    # strict JSON: a diverged layer's NaN loss is written as null
    save([_frozen(s) for s in states], out_dir, finite_or_null(meta))
    checkpoints.mark_finished(ckpt_path)  # its work is saved: a new run in out_dir may replace it
    return meta


def all_layers_done(out_dir: Path, n_layers: int | None = None):
    """For checkpoints.refuse_unfinished: whether a checkpoint from before runs were marked
    finished holds every layer of the model (`n_layers`). Before the model loads, where the
    count is unknown: whether the maps saved beside it are its own (meta.json's per_layer,
    written once every layer was done, is its layers)."""

    def complete(ckpt: dict) -> bool:
        layers = ckpt.get("layers")
        if not isinstance(layers, list):
            return False
        if n_layers is not None:
            return len(layers) >= n_layers
        try:
            saved = load_meta(out_dir)["per_layer"]
        except (OSError, ValueError, KeyError, TypeError):  # none saved, or not maps' meta
            return False
        same = [json.dumps(finite_or_null(rows), sort_keys=True) for rows in (saved, layers)]
        return bool(layers) and same[0] == same[1]

    return complete


def _frozen(state: dict) -> FeatureMap:
    return FeatureMap(*(state[name].float() for name in TENSORS))


PROG = "metaattn-viz feature-maps"  # how users reach it (the CLI forwards its arguments here)
MODULE_PROG = "python -m metaattn_viz.training.feature_maps"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Distil the linear expert's feature maps (Hedgehog) and "
        "report all-linear perplexity before and after.",
    )
    ap.add_argument("--data", required=True, help="calibration text (WikiText-2 raw)")
    ap.add_argument("--model", default=None, help="model spec (default: the bundled SmolLM2-135M)")
    ap.add_argument("--out", default=None, help="output folder (default: assets/feature_maps/<model-slug>)")
    ap.add_argument("--device", default="cpu", help="cpu|cuda|cuda:N|auto, in float32 (default cpu)")
    d = FeatureMapConfig()
    for name in ("steps", "batch_size", "seq_len", "train_windows", "val_windows", "seed"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    only = ap.add_mutually_exclusive_group()  # measure only, or train only: never both (nothing)
    only.add_argument(
        "--eval-only",
        action="store_true",
        help="only measure all-linear perplexity with the maps in --out, on windows of --seq-len, "
        "and print it (writes nothing)",
    )
    only.add_argument("--skip-eval", action="store_true", help="train only, no perplexity")
    ap.add_argument("--eval-windows", type=int, default=16, help="validation windows for perplexity")
    return ap


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """The command (`prog` names it in its help and errors). Everything a user can get wrong
    (numbers, the device, the data file, --out and an unfinished run's checkpoint there) is
    refused with exit code 2 and one line naming it, before the model loads; what only the
    model shows (a text shorter than one of its windows, a checkpoint --resume cannot use,
    maps --eval-only cannot read) in the same way, after it."""
    from metaattn_viz.routing import device as device_mod
    from metaattn_viz.routing import loading

    ap = build_parser(prog)
    args = ap.parse_args(argv)
    try:  # the numbers: FeatureMapConfig holds their ranges (one definition)
        cfg = FeatureMapConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            train_windows=args.train_windows,
            val_windows=args.val_windows,
            lr=args.lr,
            seed=args.seed,
        )
    except ValueError as exc:
        ap.error(str(exc))
    if args.eval_windows < 1:
        ap.error(f"--eval-windows must be a whole number >= 1, got {args.eval_windows}")

    def refuse(message: str) -> int:
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2

    try:
        # float32 wherever it runs, as calibrate; CUDA asked for without one is refused here
        placement = device_mod.resolve(args.device, "float32")
    except device_mod.DeviceUnavailable as exc:
        return refuse(str(exc))
    except ValueError as exc:  # not a device name at all
        ap.error(f"argument --device: {exc}")
    try:
        data_mod.load_split(args.data)  # a bad file is refused before the model loads
    except data_mod.DataError as exc:
        return refuse(str(exc))
    out = None
    if args.out is not None:
        # --eval-only reads the maps there (a read-only install will do); training writes them
        problem = None if args.eval_only else output_problem(args.out, "--out", folder=True)
        if problem:
            return refuse(problem)
        out = Path(args.out).expanduser()
        if not (args.eval_only or args.resume):
            try:
                checkpoints.refuse_unfinished(out, all_layers_done(out))
            except checkpoints.CheckpointError as exc:
                return refuse(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        loaded = loading.load(args.model)
    except (loading.ModelUnavailable, loading.IncompleteCheckpoint) as exc:
        return refuse(str(exc))
    model = loaded.model.to(placement.device)
    out = out or default_folder(loaded.slug)
    try:
        return _train_and_measure(args, cfg, model, loaded, out)
    # a text too short for a window; a checkpoint --resume cannot use; no readable maps to measure
    except (data_mod.DataError, checkpoints.CheckpointError, MapsUnavailable) as exc:
        return refuse(str(exc))


def _train_and_measure(args, cfg: FeatureMapConfig, model, loaded, out: Path) -> int:
    """main's work once the model is loaded: train (unless --eval-only), then measure."""
    if not args.eval_only:
        meta = train(
            model,
            loaded.tokenizer,
            args.data,
            cfg,
            out,
            model_slug=loaded.slug,
            model_name=loaded.name,
            resume=args.resume,
        )
        print(
            f"mean validation loss: elu+1 {meta['mean_val_loss_elu']}, "
            f"learned {meta['mean_val_loss_learned']}"
        )
    if args.skip_eval:
        return 0
    maps = load(out)  # MapsUnavailable: --eval-only where none were trained, or a damaged file
    # on windows of --seq-len, the length the maps were trained on (and that meta.json records)
    measure = {"windows": args.eval_windows, "seq_len": cfg.seq_len}
    before = all_linear_perplexity(model, loaded.tokenizer, args.data, None, **measure)
    after = all_linear_perplexity(model, loaded.tokenizer, args.data, maps, dense=before["dense"], **measure)
    # strict JSON, as eval --json: an infinite perplexity (and a ratio of two) is null
    result = finite_or_null({"elu+1": before, "learned": after})
    print(json.dumps(result, indent=2, allow_nan=False))
    if args.eval_only:  # only measures: the maps' meta.json (the shipped one by default) is kept
        return 0
    meta = load_meta(out)
    meta["all_linear_perplexity"] = result
    (out / META_FILE).write_text(json.dumps(finite_or_null(meta), indent=2, allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(prog=MODULE_PROG))
