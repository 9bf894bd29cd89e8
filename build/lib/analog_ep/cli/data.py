"""``seqep data``: build (or load from cache) one task and print what the pipeline produced."""

from __future__ import annotations

import argparse
import json
from typing import Any

EPILOG = """\
examples:
  seqep data --task imdb                          summary table (builds the cache on first use)
  seqep data --task snli --json                   the same as one JSON object (TaskData.info)
  seqep data --task imdb --vectors w2v:300        train 300-d word2vec on IMDB train (cached)
  seqep data --task imdb --max-len 400 --oov unk  other settings make another cache entry
  seqep data --task snli --data-dir ../shared/data --train-limit 2000 --eval-limit 500
  seqep data --task imdb --ngrams 2               frequent word pairs as tokens of their own (data.ngrams)

data comes from --data-dir, else $SEQEP_DATA_DIR, else the Hugging Face hub (stanfordnlp/imdb,
stanfordnlp/snli). Processed tensors are cached in --cache-dir, else $SEQEP_CACHE_DIR, else
~/.cache/seqep; the second run with the same settings loads in about a second.
SNLI note: without the full train file the local folder supplies train_subset, a 20,000-pair random
sample of SNLI train; the output says so.
"""


def _val_size(text: str) -> float | int:
    """'0.1' -> 0.1 (a fraction), '2500' -> 2500 (a count)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction like 0.1 or a count like 2500, not {text!r}") from None


def register(subparsers: Any) -> None:
    from analog_ep.data.vectors import HELP as VECTORS_HELP

    p = subparsers.add_parser(
        "data",
        help="load a data set and print split sizes, vocabulary, coverage and cache path",
        description="Load IMDB or SNLI through the dataset pipeline (building the cache entry if needed)\n"
        "and print split sizes, label counts, vocabulary size, vector dimension, coverage,\n"
        "truncation statistics and the cache path.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--task", required=True, choices=["imdb", "snli"], help="data set")
    p.add_argument("--data-dir", metavar="DIR", help="local data folder (default: $SEQEP_DATA_DIR, else the hub)")
    p.add_argument("--cache-dir", metavar="DIR", help="cache folder (default: $SEQEP_CACHE_DIR, else ~/.cache/seqep)")
    p.add_argument(
        "--max-len",
        type=int,
        metavar="L",
        help="tokens per sequence (default: IMDB 600, SNLI 25 per sentence)",
    )
    p.add_argument("--vectors", default="glove50", metavar="V", help=f"word vectors (default glove50): {VECTORS_HELP}")
    p.add_argument(
        "--oov",
        choices=["drop", "unk"],
        default="drop",
        help="tokens without a vector: drop them (paper reference) or map to the zero UNK vector",
    )
    p.add_argument(
        "--min-freq", type=int, default=1, metavar="N", help="vocabulary: minimum count in train (default 1)"
    )
    p.add_argument("--max-vocab", type=int, metavar="N", help="vocabulary: keep the N most frequent train words")
    p.add_argument(
        "--val-size",
        type=_val_size,
        default=0.1,
        metavar="X",
        help="IMDB validation carved from train: fraction or count (default 0.1; SNLI uses dev)",
    )
    p.add_argument("--train-limit", type=int, metavar="N", help="class-balanced seeded subset of train")
    p.add_argument("--eval-limit", type=int, metavar="N", help="class-balanced seeded subset of val and test")
    p.add_argument("--ngrams", type=int, default=1, metavar="N",
                   help="also add the training split's word n-grams up to order N (2 or 3) as tokens (default 1)")
    p.add_argument("--ngram-min-freq", type=int, default=3, metavar="N",
                   help="an n-gram joins the vocabulary at this many train occurrences (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed for the validation carve, limits and word2vec")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from analog_ep.data.ngrams import add_ngrams, check_ngram_args
    from analog_ep.data.task import load_task

    check_ngram_args(args.ngrams, args.ngram_min_freq)
    words = load_task(
        args.task,
        data_dir=args.data_dir,
        max_len=args.max_len,
        vectors=args.vectors,
        min_freq=args.min_freq,
        max_vocab=args.max_vocab,
        oov=args.oov,
        val_size=args.val_size,
        train_limit=args.train_limit,
        eval_limit=args.eval_limit,
        seed=args.seed,
        cache_dir=args.cache_dir,
        progress=not args.quiet,
    )
    task = add_ngrams(words, args.ngrams, args.ngram_min_freq)
    if args.json:
        print(json.dumps(task.info, indent=2))
    else:
        print(format_table(task.info))
    return 0


def format_table(info: dict[str, Any]) -> str:
    """A readable summary of ``TaskData.info``."""
    names = info["class_names"]
    lines = [f"task        {info['task']}   (streams: {', '.join(info['streams'])}; max_len {info['max_len']})"]
    for note in info.get("notes", []):
        lines.append(f"NOTE        {note}")
    lines.append("")
    header = f"{'split':<6} {'source':<14} {'size':>7}  " + "  ".join(f"{n:>13}" for n in names)
    header += f"  {'truncated':>9}  {'mean len':>8}  {'in-vocab':>8}"
    lines.append(header)
    for role, split in info["splits"].items():
        source = split["source_split"] + (" (carved)" if split.get("carved_from_train") else "")
        trunc = info["truncation"][role]
        mean = "/".join(f"{x:.0f}" for x in trunc.get("mean_tokens", []))
        counts = "  ".join(f"{split['label_counts'][n]:>13,}" for n in names)
        lines.append(
            f"{role:<6} {source:<14} {split['size']:>7,}  {counts}  {trunc['fraction_truncated']:>9.2%}  "
            f"{mean:>8}  {info['coverage_in_vocab'][role]:>8.2%}"
        )
    vec, voc = info["vectors"], info["vocab"]
    lines += [
        "",
        f"vectors     {vec['spec']}: {vec.get('name', '')}, {vec['dim']}-d, {vec['words']:,} words",
        f"vocabulary  {voc['size']:,} ids (PAD, UNK + {voc['words']:,} train words with a vector; "
        f"min_freq {voc['min_freq']}, oov={voc['oov']})",
        f"coverage    {info['coverage']:.2%} of {info['train_tokens']:,} train tokens have a vector",
        *_ngram_lines(info),
        f"cache       {info['cache_path']} ({'hit' if info['cache_hit'] else 'built'} in {info['load_seconds']} s)",
    ]
    return "\n".join(lines)


def _ngram_lines(info: dict[str, Any]) -> list[str]:
    grams = info.get("ngrams")
    if not grams:
        return []
    added = ", ".join(f"{count:,} of order {order}" for order, count in grams["added"].items())
    return [f"n-grams     {added} (min_freq {grams['min_freq']}); {grams['word_slots']} word slots + n-gram slots"]
