"""The page's words about itself: the introduction above the tabs, and the About tab (what
each view shows, the paper, how to cite it and this software).

The paper is A. Ferrari, *Meta-Attention: Bayesian Per-Token Routing for Efficient
Transformer Inference*, arXiv:2605.28384 (2026), as docs/method.md cites it; the software
citation names no authors (none are recorded) and gives the package version. Plain
strings: never imports gradio.
"""

from __future__ import annotations

from metaattn_viz import __version__

PAPER_TITLE = "Meta-Attention: Bayesian Per-Token Routing for Efficient Transformer Inference"
PAPER_AUTHORS = "Ferrari, A."  # as the project's method notes give them (an initial only)
PAPER_ARXIV = "2605.28384"
PAPER_YEAR = 2026
PAPER_URL = f"https://arxiv.org/abs/{PAPER_ARXIV}"

INTRO = """# metaattn-viz
Every token in every layer of a real language model is routed to **full**, **linear** or
**local** attention by a Bayesian meta-controller under a compute budget. Generate, watch the
decisions fill in, drag the budget, click a token to see its posterior and the attention it
actually used."""

VIEWS = """
### What you see
- **Expert map**: one cell per (layer, token): the expert the controller's posterior and the
  budget solver chose. Vermillion = full attention (cost 1.0), yellow = local sliding window
  (0.3), sky blue = linear attention (0.15); an **x** marks a hedged decision (an uncertain
  cheap decision that mixes in other experts). The dashed line separates prompt and output.
- **Uncertainty map**: total (entropy of the posterior mean), aleatoric, epistemic (mutual
  information) or vacuity (K / evidence). The prior-free controller is a point estimate: it
  has no epistemic part.
- **Meters**: realised cost against the budget (notional costs, or a share of dense
  attention FLOPs, as the run's cost model says), the real attention FLOPs against
  dense attention (for short texts linear attention costs more FLOPs than full), tokens per
  second, and KL(dense || routed) per token from a dense shadow pass (switch it off to save
  a forward pass per change). After a re-route the tokens/s meter shows the re-route's rate.
- **Budget slider**: on release the same text is routed again (prompt and output together,
  as a prefill), so the maps show what the controller would have done at that budget. The
  budget scope says who meets it: all layers together (global, the default: layers that
  need full attention get it, others give it up) or every layer on its own.
- **Export and share**: the current trace as JSON, the maps as a page that opens offline,
  the run's rows of the routing log as Parquet or CSV, and a link that opens this page on
  the run (replayed from the log, or, where the log does not have it, its settings and
  prompt). Every figure's toolbar saves it as PNG (camera) or SVG.
- **History**: every run, replayable without the model; the SQL console is read-only. On
  a public Space each visitor sees only the runs of their own browser session (unless the
  operator shares the log, and then the header says so).
"""


def paper_bibtex() -> str:
    """The paper's BibTeX entry."""
    return (
        "@misc{ferrari2026metaattention,\n"
        f"  title         = {{{{{PAPER_TITLE}}}}},\n"
        f"  author        = {{{PAPER_AUTHORS}}},\n"
        f"  year          = {{{PAPER_YEAR}}},\n"
        f"  eprint        = {{{PAPER_ARXIV}}},\n"
        "  archivePrefix = {arXiv},\n"
        f"  url           = {{{PAPER_URL}}}\n"
        "}"
    )


def software_bibtex(version: str = __version__) -> str:
    """This software's BibTeX entry (no authors are recorded, so none are named)."""
    return (
        "@misc{metaattn_viz,\n"
        "  title        = {{metaattn-viz: watching Bayesian per-token attention routing "
        "(Meta-Attention) in a real language model}},\n"
        f"  version      = {{{version}}},\n"
        f"  year         = {{{PAPER_YEAR}}},\n"
        f"  note         = {{Software, version {version}, Apache-2.0; implements arXiv:{PAPER_ARXIV}}}\n"
        "}"
    )


def about_markdown() -> str:
    """The About tab: the views, the paper, the citations."""
    return (
        VIEWS
        + "\n### The method\n"
        + f"[*{PAPER_TITLE}*]({PAPER_URL}), A. Ferrari, arXiv:{PAPER_ARXIV} ({PAPER_YEAR}). "
        + "This app implements it on a pretrained model; where the paper leaves a choice, "
        + "the project's docs/method.md says what was chosen and why.\n"
        + "\n### Cite\nThe paper:\n\n```bibtex\n"
        + paper_bibtex()
        + "\n```\n\nThis software:\n\n```bibtex\n"
        + software_bibtex()
        + "\n```\n"
    )


__all__ = [
    "INTRO",
    "PAPER_URL",
    "PAPER_TITLE",
    "PAPER_ARXIV",
    "about_markdown",
    "paper_bibtex",
    "software_bibtex",
]
