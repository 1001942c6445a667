"""Build the movie-sentiment task (binary, SST-2-like) from VADER's movie-review snippets.

    python scripts/make_movie_sentiment.py [path/to/movieReviewSnippets_GroundTruth.txt]

The source has one line per sentence, `id<TAB>score<TAB>sentence`, where score is the mean
human rating in [-4, 4]. label = 1 if score > 0, 0 if score < 0; rows with score exactly 0
carry no polarity and are dropped. A seeded shuffle (seed 0) then puts the first 9,000 rows
in train.tsv and the rest in dev.tsv, written in the GLUE SST-2 format (`sentence<TAB>label`
header). Running it again gives byte-identical files.
"""
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SOURCE = os.path.join(
    ROOT, "..", "shared", "data", "vader", "movieReviewSnippets_GroundTruth.txt"
)
OUT_DIR = os.path.join(ROOT, "data", "movie-sentiment")
SEED = 0
N_TRAIN = 9000


def clean_sentence(text):
    # The TSV has no quoting, so a tab or newline inside a sentence would break a row.
    text = text.replace("\t", " ").replace("\r", " ").replace("\n", " ")
    return " ".join(text.split())


def read_source(path):
    """Return [(sentence, label)] in file order, dropping neutral (score 0) rows."""
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) != 3:
                sys.exit(f"error: {path}:{line_no}: expected id<TAB>score<TAB>sentence")
            _, score, sentence = parts
            try:
                score = float(score)
            except ValueError:
                sys.exit(f"error: {path}:{line_no}: score {score!r} is not a number")
            sentence = clean_sentence(sentence)
            if score == 0 or not sentence:
                continue
            rows.append((sentence, 1 if score > 0 else 0))
    return rows


def write_tsv(path, rows):
    # "\n" line ends whatever the platform, so the files are the same everywhere.
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("sentence\tlabel\n")
        for sentence, label in rows:
            f.write(f"{sentence}\t{label}\n")


def main():
    source = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_SOURCE
    if not os.path.isfile(source):
        sys.exit(f"error: source file not found: {source}")
    rows = read_source(source)
    random.Random(SEED).shuffle(rows)
    os.makedirs(OUT_DIR, exist_ok=True)
    write_tsv(os.path.join(OUT_DIR, "train.tsv"), rows[:N_TRAIN])
    write_tsv(os.path.join(OUT_DIR, "dev.tsv"), rows[N_TRAIN:])
    n_pos = sum(label for _, label in rows)
    print(f"{len(rows)} rows ({n_pos} positive): train {N_TRAIN}, dev {len(rows) - N_TRAIN}")
    print(f"written to {OUT_DIR}")


if __name__ == "__main__":
    main()
