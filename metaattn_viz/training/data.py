"""Real text for calibration and evaluation: read, check, split by article, tokenise.

Calibration measures its self-distillation task term on these windows (docs/method.md,
ELBO); evaluation reports on the validation articles.

WikiText-2 raw marks an article with a top-level heading line `` = Title = `` (sections
use `` = = ... = = ``; trailing whitespace does not matter); a text without such headings
is split into paragraphs instead. The split is by article and deterministic: article i
(0-based, in file order) goes to validation when i % 10 == 9, to training otherwise, and
with fewer than 10 articles the last one is held out for validation; so at least 2 are
needed (validation is never the training text). Every problem with the file (missing,
empty, binary, too short, a single article) raises DataError before any model work.
Never imports the model or the UI, nor torch at import (training/report.py reads the
split's rule from here).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

VALIDATION_EVERY = 10
SPLIT_RULE = (
    f"article i goes to validation when i % {VALIDATION_EVERY} == {VALIDATION_EVERY - 1} "
    "(file order), else to training"
)
MIN_ARTICLES = 2  # one for training, one held out for validation


def usual_rule(unit: str = "article") -> str:
    """The split's rule in a report's words, for `unit`s ("articles i % 10 == 9")."""
    return f"{unit}s i % {VALIDATION_EVERY} == {VALIDATION_EVERY - 1}"


_TITLE = re.compile(r"^ = [^=].* =$")  # matched with trailing whitespace stripped (editors drop it)


TOO_SHORT_REMEDY = "give a longer file or a smaller --seq-len"  # for the commands that have --seq-len


class DataError(ValueError):
    """A data file that cannot be used; the message says why and what to do."""


class TooShort(DataError):
    """A text shorter than one window. The message ends with what to do, which depends on
    the command (``remedy``; the default names eval's and feature-maps' --seq-len, which
    calibrate and lambda-table do not have): ``with_remedy`` says it for another caller."""

    def __init__(self, what: str, tokens: int, seq_len: int, remedy: str = TOO_SHORT_REMEDY):
        self.what, self.tokens, self.seq_len, self.remedy = what, tokens, seq_len, remedy
        super().__init__(
            f"the {what} text is shorter than one window ({tokens} tokens < {seq_len}); {remedy}"
        )

    def with_remedy(self, remedy: str) -> TooShort:
        return TooShort(self.what, self.tokens, self.seq_len, remedy)


@dataclass
class Split:
    train: list[str]
    validation: list[str]
    sha256: str
    path: str
    unit: str = "article"  # "paragraph" for a text without `` = Title = `` headings

    def validation_rule(self) -> str:
        """Which texts validate, in words for a report: "articles i % 10 == 9" under the
        usual rule, else (fewer than VALIDATION_EVERY texts) the last one."""
        n = len(self.train) + len(self.validation)
        if n >= VALIDATION_EVERY:
            return usual_rule(self.unit)
        return f"the last of its {n} {self.unit}s"

    def describe(self) -> dict:
        return {
            "file": self.path,
            "sha256": self.sha256,
            "articles_train": len(self.train),
            "articles_validation": len(self.validation),
            "rule": SPLIT_RULE,
        }


def read_text(path) -> tuple[str, str]:
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file not found: {p}")
    if not p.is_file():
        raise DataError(f"data path is not a file: {p}")
    raw = p.read_bytes()
    if not raw.strip():
        raise DataError(f"data file is empty: {p}")
    if b"\x00" in raw[:65536]:
        raise DataError(f"data file looks binary (NUL bytes), expected UTF-8 text: {p}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"data file is not UTF-8 text ({exc.reason} at byte {exc.start}): {p}") from None
    return text, hashlib.sha256(raw).hexdigest()


def split_articles(text: str) -> list[str]:
    articles, current = [], []
    for line in text.splitlines():
        if _TITLE.match(line.rstrip()) and current:
            articles.append("\n".join(current).strip())
            current = []
        current.append(line)
    if current:
        articles.append("\n".join(current).strip())
    return [a for a in articles if a]


def load_split(path) -> Split:
    """The file's articles split into training and validation (``SPLIT_RULE``; with fewer
    than ``VALIDATION_EVERY`` the last one validates). A file without `` = Title = ``
    headings is split by paragraphs. Fewer than ``MIN_ARTICLES`` raise DataError: the one
    text would be validated on itself."""
    text, sha = read_text(path)
    articles, unit = split_articles(text), "article"
    if len(articles) < 2:  # a plain text file without headings: split it by paragraphs
        articles, unit = [a for a in re.split(r"\n\s*\n", text) if a.strip()], "paragraph"
    if len(articles) < MIN_ARTICLES:
        raise DataError(
            f"the data holds only {len(articles)} article (or, without `` = Title = `` headings, "
            f"{len(articles)} paragraph; each text given to calibrate is one): give at least "
            f"{MIN_ARTICLES}, because validation must not be the training text ({SPLIT_RULE}; with "
            f"fewer than {VALIDATION_EVERY} articles the last one validates)"
        )
    val = [a for i, a in enumerate(articles) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1]
    train = [a for i, a in enumerate(articles) if i % VALIDATION_EVERY != VALIDATION_EVERY - 1]
    if not val:  # few articles: keep the last one for validation
        val = [train.pop()]
    return Split(train, val, sha, str(path), unit)


def windows(tokenizer, articles: list[str], seq_len: int, what: str = "training") -> torch.Tensor:
    """Concatenate the articles' tokens and cut them into [N, seq_len] windows; TooShort
    (a DataError) when they do not fill one."""
    import torch

    ids: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for art in articles:
        ids.extend(tokenizer(art, add_special_tokens=False)["input_ids"])
        if isinstance(eos, int):
            ids.append(eos)
    n = len(ids) // seq_len
    if n < 1:
        raise TooShort(what, len(ids), seq_len)
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)
