"""The attention each token actually used, for bertviz's head and model views.

A routed decision mixes three experts, so "the attention pattern" of a token in a layer is
the mixture, under the trace's `weights`, of each expert's implicit weights over the keys:

    full   = causal softmax(scale q.k) over keys j <= i
    local  = softmax over the window (i - window, i] plus the first n_sink keys
    linear = phi(q).phi(k_j) / (sum_j' phi(q).phi(k_j') + eps), phi = the run's feature map
             (elu + 1, or the learned map of its layer when the run's linear_map is "learned";
             the capture carries the map the pass used)

(the same maths as metaattn_kernels.reference, so pattern @ v equals the routed output:
the tests check this). q and k come from a prefill with `capture_qk=True` whose weights were forced
to the trace's, so the patterns are those of the decisions shown in the maps.

bertviz draws a square token x token matrix for every layer and head; a long text would
make megabytes of HTML, so the view keeps the attention sinks plus the last tokens up to
the selected one (`view_positions`) and says how much of the token's attention those
positions hold. bertviz's page loads require.js, d3 and jQuery from a CDN: the URLs are
rewritten to the copies vendored in assets/vendor (served by the app), and the page goes
into an `<iframe srcdoc>` because gr.HTML never runs scripts.

The head and model views arrive together, one in a hidden tab. Chromium lets only one
request for a URL fill its cache at a time, so when both frames asked for the same
script the shown one could wait seconds on the hidden one (measured: 8 s), past
require.js's 7 s load timeout, after which require.js gives up for good and the view
stays blank (issue 16). So each view loads the scripts under its own URL (`urlArgs`),
and require.js never gives up waiting (`waitSeconds: 0`).

Never imports gradio or the model; works on tensors given to it.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass

import numpy as np
import torch

from metaattn_kernels.feature_maps import FeatureMap, phi_key, phi_query
from metaattn_viz.app.plots.style import printable
from metaattn_viz.core.settings import FULL, LINEAR, LOCAL
from metaattn_viz.paths import ASSETS_DIR

VENDOR_DIR = ASSETS_DIR / "vendor"
# bertviz 1.4.1's CDN addresses -> vendored file (require.js paths take no ".js").
CDN_REWRITES = {
    "https://cdnjs.cloudflare.com/ajax/libs/require.js/2.3.6/require.min.js": "requirejs-2.3.6/require.js",
    "https://cdnjs.cloudflare.com/ajax/libs/d3/5.7.0/d3.min": "d3-5.7.0/d3.min",
    "https://cdnjs.cloudflare.com/ajax/libs/jquery/2.0.0/jquery.min": "jquery-2.1.0/jquery.min",
}
DEFAULT_MAX_TOKENS = 24  # bertviz matrix side: 30 layers x 9 heads x 24^2 ~ 0.8 MB of HTML


def vendor_base_url() -> str:
    """Where the app serves assets/vendor. Relative on purpose: an iframe srcdoc document
    resolves URLs against its parent page, so this works under any mount path or host."""
    return f"gradio_api/file={VENDOR_DIR.as_posix()}"


def expert_patterns(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    query_pos: torch.Tensor,
    window: int,
    n_sink: int,
    eps: float = 1e-6,
    feature_map: FeatureMap | None = None,
) -> torch.Tensor:
    """Each expert's attention weights of the query rows over all keys.

    q [Hq, Tq, D] at absolute positions query_pos [Tq]; k [Hkv, Tk, D] at positions 0..Tk-1
    (grouped-query: head h reads kv head h // (Hq / Hkv)); feature_map: the linear expert's
    map of this layer (None: elu + 1). Returns [3, Hq, Tq, Tk] float64 (full, linear,
    local), rows summing to 1 (linear: 1 - eps / (den + eps)).
    """
    hq, hkv = q.shape[0], k.shape[0]
    q64 = q.double()
    k64 = k.double().repeat_interleave(hq // hkv, dim=0)  # [Hq, Tk, D]
    kpos = torch.arange(k.shape[1])[None, :]  # [1, Tk]
    qpos = query_pos.long()[:, None]  # [Tq, 1]
    causal = kpos <= qpos  # [Tq, Tk]
    local = causal & ((kpos > qpos - window) | (kpos < n_sink))
    scores = (q64 @ k64.transpose(-1, -2)) * scale  # [Hq, Tq, Tk]
    full_w = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
    local_w = torch.softmax(scores.masked_fill(~local, float("-inf")), -1)
    # the learned key maps are per kv head: map the keys first, then repeat them per group
    phi_q = phi_query(feature_map, q64[None])[0]
    phi_k = phi_key(feature_map, k.double()[None])[0].repeat_interleave(hq // hkv, dim=0)
    a = (phi_q @ phi_k.transpose(-1, -2)).masked_fill(~causal, 0.0)  # [Hq, Tq, Tk]
    lin_w = a / (a.sum(-1, keepdim=True) + eps)
    out = torch.empty((3,) + full_w.shape, dtype=torch.float64)
    out[FULL], out[LINEAR], out[LOCAL] = full_w, lin_w, local_w
    return out


def mixed_pattern(
    q,
    k,
    scale,
    query_pos,
    weights,
    window: int,
    n_sink: int,
    eps: float = 1e-6,
    feature_map: FeatureMap | None = None,
) -> torch.Tensor:
    """The attention the rows actually used: sum_e weights[row, e] * pattern_e.
    weights [Tq, 3] -> [Hq, Tq, Tk] float64."""
    pats = expert_patterns(q, k, scale, query_pos, window, n_sink, eps, feature_map)  # [3, Hq, Tq, Tk]
    w = torch.as_tensor(np.asarray(weights), dtype=torch.float64)  # [Tq, 3]
    return torch.einsum("ehqk,qe->hqk", pats, w)


def view_positions(pos: int, n_sink: int, max_tokens: int = DEFAULT_MAX_TOKENS) -> list[int]:
    """The positions bertviz shows for token `pos`: the first n_sink, then the last ones up to
    `pos`, at most max_tokens in all, in order."""
    if pos < 0 or max_tokens < 1:
        raise ValueError(f"pos must be >= 0 and max_tokens >= 1, got {pos}, {max_tokens}")
    if pos + 1 <= max_tokens:
        return list(range(pos + 1))
    sinks = list(range(min(n_sink, max_tokens - 1)))
    tail = list(range(pos - (max_tokens - len(sinks)) + 1, pos + 1))
    return sinks + [p for p in tail if p >= len(sinks)]


@dataclass
class AttentionView:
    """Attention among `positions` for every layer: attention [L, Hq, S, S] float64 (rows of
    the selected token's prefix, restricted to the shown positions), the tokens shown, and
    the share of the selected token's attention (mean over layers and heads) they hold."""

    attention: np.ndarray
    tokens: list[str]
    positions: list[int]
    pos: int
    shown_mass: float


def attention_view(
    qk: list,
    weights: np.ndarray,
    tokens: list[str],
    pos: int,
    window: int,
    n_sink: int,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> AttentionView:
    """From a capture (`qk[layer] = (q [1,Hq,T,D], k [1,Hkv,T,D], scale[, feature map])` over
    positions 0..T-1, T > pos; the map the pass's linear expert used, None or absent: elu + 1)
    and the trace's weights [L, T, 3]: the mixed attention among the positions bertviz will
    show."""
    shown = view_positions(pos, n_sink, max_tokens)
    idx = torch.tensor(shown)
    layers, mass = [], []
    for layer, (q, k, scale, *feature_map) in enumerate(qk):
        q_rows = q[0][:, idx]  # [Hq, S, D]
        keys = k[0][:, : pos + 1]  # [Hkv, pos+1, D]
        fm = feature_map[0] if feature_map else None
        pat = mixed_pattern(
            q_rows, keys, float(scale), idx, weights[layer, shown], window, n_sink, feature_map=fm
        )  # [Hq, S, pos+1]
        sub = pat[:, :, idx]  # [Hq, S, S]
        layers.append(sub.numpy())
        mass.append(float(sub[:, -1].sum(-1).mean()))
    return AttentionView(np.stack(layers), [tokens[p] for p in shown], shown, pos, float(np.mean(mass)))


def _display_tokens(tokens: list[str], positions: list[int]) -> list[str]:
    out = []
    for p, t in zip(positions, tokens, strict=True):
        t = printable(t)  # as the maps' axes name it (a zero-width space as <U+200B>)
        out.append(f"{t}" if t.strip() else f"[{p}]{t}")
    # bertviz keys its token boxes by text in places: make each label unique
    seen: dict[str, int] = {}
    for i, t in enumerate(out):
        if t in seen:
            out[i] = f"{t}\u200b[{positions[i]}]"
        seen[t] = i
    return out


def _rewrite_cdn(page: str, view: str) -> str:
    """bertviz's page with its scripts loaded from the app under URLs of the view's own
    (`?view=...`), and require.js told never to give up (see the module docstring)."""
    base = vendor_base_url()
    args = f"view={view}"
    require_cdn = next(cdn for cdn, local in CDN_REWRITES.items() if local.startswith("requirejs"))
    for cdn, local in CDN_REWRITES.items():
        url = f"{base}/{local}?{args}" if cdn == require_cdn else f"{base}/{local}"
        page = page.replace(cdn, url)
    if "cdnjs.cloudflare.com" in page:  # a bertviz release with new URLs: fail loudly
        raise RuntimeError(
            "bertviz's page still points at cdnjs after rewriting; update "
            "attention_maps.CDN_REWRITES for this bertviz version"
        )
    tag = page.find(f"{base}/{CDN_REWRITES[require_cdn]}")
    end = page.find("</script>", tag)
    if tag < 0 or end < 0:
        raise RuntimeError("bertviz's page no longer loads require.js; update attention_maps")
    end += len("</script>")
    config = json.dumps({"waitSeconds": 0, "urlArgs": args})
    return f"{page[:end]}<script>require.config({config});</script>{page[end:]}"


def _bertviz_attention(view: AttentionView) -> list[torch.Tensor]:
    # 3 decimals: the JSON inside the page is most of its size
    rounded = np.round(view.attention, 3)
    return [torch.from_numpy(rounded[layer])[None] for layer in range(rounded.shape[0])]


def head_view_page(view: AttentionView, layer: int = 0) -> str:
    """bertviz's head view as a standalone HTML page using the vendored scripts."""
    from bertviz import head_view

    out = head_view(
        attention=_bertviz_attention(view),
        tokens=_display_tokens(view.tokens, view.positions),
        layer=int(layer),
        prettify_tokens=False,
        html_action="return",
    )
    return _page(_rewrite_cdn(out.data, "head"), "head view")


def model_view_page(view: AttentionView, layers: list[int] | None = None) -> str:
    """bertviz's model view (every layer x head as a thumbnail) as a standalone page."""
    from bertviz import model_view

    out = model_view(
        attention=_bertviz_attention(view),
        tokens=_display_tokens(view.tokens, view.positions),
        include_layers=layers,
        prettify_tokens=False,
        display_mode="light",
        html_action="return",
    )
    return _page(_rewrite_cdn(out.data, "model"), "model view")


def _page(body: str, title: str) -> str:
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>body{{margin:6px;background:#fff;"
        "color:#111;font-family:Helvetica,Arial,sans-serif}</style></head><body>"
        f"{body}</body></html>"
    )


def iframe(page: str, height: int = 640, title: str = "attention view") -> str:
    """Embed a page with scripts in gr.HTML: a sandboxed srcdoc iframe (scripts allowed, no
    access to the app's origin)."""
    return (
        f"<iframe class='metaattn-bertviz' title={json.dumps(title)} "
        f"sandbox='allow-scripts' style='width:100%;height:{int(height)}px;border:1px "
        f"solid #ddd;border-radius:6px;background:#fff' "
        f'srcdoc="{html.escape(page, quote=True)}"></iframe>'
    )


def message(text: str) -> str:
    """A plain note in place of a view."""
    return f"<div class='metaattn-note' style='padding:12px;color:#555'>{html.escape(text)}</div>"


__all__ = [
    "expert_patterns",
    "mixed_pattern",
    "view_positions",
    "AttentionView",
    "attention_view",
    "head_view_page",
    "model_view_page",
    "iframe",
    "message",
    "vendor_base_url",
    "VENDOR_DIR",
]
