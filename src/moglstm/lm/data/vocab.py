"""The token <-> id mapping of a corpus, storable as plain data in a checkpoint."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from itertools import repeat
from typing import Any

from torch import Tensor

from moglstm.lm.data.sources import EOS, LEVELS, UNK
from moglstm.lm.errors import UserError
from moglstm.lm.safety import short_repr, utf8_bytes

__all__ = ["WORD_TOKEN", "Vocab", "split_punctuation"]

#: How the bundled Shakespeare corpus was cut into words (experiments/make_shakespeare.py):
#: "--", a word (inner apostrophes and hyphens, a leading or trailing apostrophe), or one
#: punctuation character. Case is kept.
WORD_TOKEN = re.compile(r"--|'?[A-Za-z0-9]+(?:['-][A-Za-z0-9]+)*'?|\S")


def split_punctuation(text: str) -> list[str]:
    """``text`` cut like the Shakespeare corpus: ``"Romeo, where art thou?"`` ->
    ``["Romeo", ",", "where", "art", "thou", "?"]``."""
    return WORD_TOKEN.findall(text)


class Vocab:
    r"""A token <-> id mapping for one corpus level, storable as plain data.

    Args:
        tokens: the token strings; a token's id is its position. No duplicates.
        level: ``"word"``, ``"char"`` or ``"byte"``; decides :meth:`tokenize`.
        unk: the token that unknown tokens map to (must be in ``tokens``), or ``None``
            for a closed vocabulary (unknown tokens are then an error).
        eos: the end-of-line token (must be in ``tokens``), or ``None``.
        space: char level only: the token standing for a space between words (``"_"``
            for ``ptb-char``); ``None`` when a space is its own token.

    Build one from a token stream with :meth:`from_tokens`, or the 256-byte vocabulary
    with :meth:`byte_level`. :meth:`to_dict`/:meth:`from_dict` round-trip through lists and
    strings, so a checkpoint read with ``torch.load(weights_only=True)`` can hold it.

    Example::

        >>> v = Vocab.from_tokens("the cat <eos> the dog <eos>".split())
        >>> v.encode(["the", "cow"])  # "cow" is unknown
        [0, 4]
        >>> v.detokenize(v.decode(v.encode(v.tokenize("the dog\nthe cat"))))
        'the dog\nthe cat'
    """

    def __init__(
        self,
        tokens: Sequence[str],
        *,
        level: str = "word",
        unk: str | None = UNK,
        eos: str | None = EOS,
        space: str | None = None,
    ) -> None:
        if isinstance(tokens, str):
            raise TypeError("tokens must be a sequence of str, not a single str")
        self._itos: tuple[str, ...] = tuple(tokens)
        if not all(isinstance(t, str) for t in self._itos):
            raise TypeError("tokens must be a sequence of str")
        if level not in LEVELS:
            raise UserError(f"level must be one of {LEVELS}, got {short_repr(level)}")
        self._stoi: dict[str, int] = {t: i for i, t in enumerate(self._itos)}
        if len(self._stoi) != len(self._itos):
            dup = next(t for t, n in Counter(self._itos).items() if n > 1)
            raise UserError(f"tokens must be distinct; {short_repr(dup)} occurs more than once")
        for arg, tok in (("unk", unk), ("eos", eos), ("space", space)):
            if tok is not None and tok not in self._stoi:
                raise UserError(f"{arg} token {short_repr(tok)} is not in the vocabulary")
        if space is not None and level != "char":
            raise UserError(f"space is only used at char level, got level={short_repr(level)}")
        self.level, self.unk, self.eos, self.space = level, unk, eos, space

    @classmethod
    def from_tokens(
        cls,
        stream: Iterable[str],
        *,
        level: str = "word",
        unk: str | None = UNK,
        eos: str | None = EOS,
        space: str | None = None,
    ) -> Vocab:
        """Build a vocabulary from a token stream (typically the training split).

        Tokens are ordered by decreasing frequency, ties by first appearance; ``eos``
        and ``unk`` are appended when the stream lacks them.
        """
        counts = Counter(stream)
        tokens = [t for t, _ in counts.most_common()]
        tokens += [t for t in (eos, unk) if t is not None and t not in counts]
        return cls(tokens, level=level, unk=unk, eos=eos, space=space)

    @classmethod
    def byte_level(cls) -> Vocab:
        """The byte-level vocabulary: 256 tokens ``chr(0) .. chr(255)``, id == byte value."""
        return cls([chr(i) for i in range(256)], level="byte", unk=None, eos=None)

    def __len__(self) -> int:
        return len(self._itos)

    def __contains__(self, token: object) -> bool:
        return token in self._stoi

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)}, level={self.level!r}, unk={self.unk!r}, eos={self.eos!r})"

    @property
    def tokens(self) -> tuple[str, ...]:
        """All tokens, in id order."""
        return self._itos

    @property
    def unk_id(self) -> int | None:
        """Id of the unknown-token, or ``None``."""
        return None if self.unk is None else self._stoi[self.unk]

    @property
    def eos_id(self) -> int | None:
        """Id of the end-of-line token, or ``None``."""
        return None if self.eos is None else self._stoi[self.eos]

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """Map tokens to ids; tokens not in the vocabulary map to ``unk``.

        Raises:
            ValueError: a token is unknown and the vocabulary has no ``unk``.
        """
        if isinstance(tokens, str):
            raise TypeError("encode takes a list of tokens; use tokenize() on a string first")
        tokens = list(tokens)
        ids = list(map(self._stoi.get, tokens, repeat(self.unk_id)))  # C-speed lookup
        if self.unk is None and None in ids:
            bad = next(t for t in tokens if t not in self._stoi)
            raise UserError(f"token {short_repr(bad)} is not in the vocabulary (which has no unk)")
        return ids

    def decode(self, ids: Iterable[int] | Tensor) -> list[str]:
        """Map ids (ints or a 1-D integer tensor) back to tokens."""
        if isinstance(ids, Tensor):
            ids = ids.reshape(-1).tolist()
        out = []
        for i in ids:
            if not 0 <= i < len(self._itos):
                raise UserError(f"id {i} is out of range for a vocabulary of {len(self)}")
            out.append(self._itos[i])
        return out

    def tokenize(self, text: str) -> list[str]:
        r"""Split ``text`` into tokens the way the corpus files are read.

        Word level splits on whitespace; char level takes characters (a space becomes
        :attr:`space` when set, e.g. ``_`` for ptb-char); byte level takes the UTF-8
        bytes (as ``chr(b)``; command-line bytes that are not UTF-8 are kept as they
        were, see :func:`~moglstm.lm.safety.utf8_bytes`). At word and char level a
        newline becomes ``eos``. Any string is accepted: what the vocabulary lacks is
        mapped to ``unk`` by :meth:`encode`.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if self.level == "byte":
            return [chr(b) for b in utf8_bytes(text)]
        out: list[str] = []
        for k, line in enumerate(text.split("\n")):
            if k and self.eos is not None:
                out.append(self.eos)
            out.extend(self._line_tokens(line))
        return out

    def tokenize_prompt(self, text: str) -> list[str]:
        """:meth:`tokenize` for text as people type it: at word level a word the vocabulary
        lacks is cut with :func:`split_punctuation` when that gives several tokens
        (``Romeo,`` -> ``Romeo ,``; ``thou?`` -> ``thou ?``), as corpora that split
        punctuation off words were cut. Case is kept, as the corpus has it; what is still
        unknown maps to ``unk``."""
        tokens = self.tokenize(text)
        if self.level != "word":
            return tokens
        out: list[str] = []
        for token in tokens:
            pieces = [] if token in self or token == self.eos else split_punctuation(token)
            out.extend(pieces if len(pieces) > 1 else [token])
        return out

    def _line_tokens(self, line: str) -> list[str]:
        if self.level == "word":
            return line.split()
        if self.space is not None:  # ptb-char: words are joined by `space`, no ' ' tokens
            return [self.space if c.isspace() else c for c in " ".join(line.split())]
        return list(line)

    def detokenize(self, tokens: Iterable[str]) -> str:
        """Join tokens back into text (inverse of :meth:`tokenize` up to whitespace)."""
        tokens = list(tokens)
        if self.level == "byte":
            raw = bytes(ord(t) for t in tokens if len(t) == 1 and ord(t) < 256)
            return raw.decode("utf-8", errors="replace")
        lines, line = [], []
        for t in tokens:
            if t == self.eos:
                lines.append(line)
                line = []
            else:
                line.append(" " if t == self.space else t)
        lines.append(line)
        sep = " " if self.level == "word" else ""
        return "\n".join(sep.join(words) for words in lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, str, None) for checkpoints; inverse of :meth:`from_dict`."""
        return {
            "tokens": list(self._itos),
            "level": self.level,
            "unk": self.unk,
            "eos": self.eos,
            "space": self.space,
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> Vocab:
        """Rebuild a vocabulary from :meth:`to_dict`'s output."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping, got {type(state).__name__}")
        missing = {"tokens", "level"} - set(state)
        if missing:
            raise UserError(f"vocab state lacks {sorted(missing)}")
        return cls(
            list(state["tokens"]),
            level=state["level"],
            unk=state.get("unk"),
            eos=state.get("eos"),
            space=state.get("space"),
        )


