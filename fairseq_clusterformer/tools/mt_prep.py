#!/usr/bin/env python3
"""Network-free steps of the translation recipes, in Python instead of Moses' Perl scripts.

fairseq's ``examples/translation/prepare-iwslt14.sh`` and ``prepare-wmt14en2de.sh`` clone Moses and
subword-nmt and pipe text through ``grep``/``sed``/Perl. The recipes in this folder do the same
steps with packages from PyPI: ``sacremoses`` (Moses tokenizer, punctuation normaliser,
detokenizer), ``subword-nmt`` (BPE) and, optionally, ``sentencepiece``. Every step is a function
here and a sub-command of this file, so the shell recipes and the tests call the same code::

    clusterformer-mt-prep xml-segs FILE.xml OUT              # grep '<seg id' | sed ... (dev/test XML, SGML)
    clusterformer-mt-prep train-tags FILE OUT                # IWSLT train.tags: drop <url>/<talkid>/..., untag
    clusterformer-mt-prep tokenize --lang de [--lowercase] [--aggressive-dash]
                               [--normalize-punct] [--remove-non-printing] [--workers N] IN OUT
    clusterformer-mt-prep lowercase IN OUT                   # Moses lowercase.perl
    clusterformer-mt-prep clean --ratio 1.5 PREFIX L1 L2 OUTPREFIX MIN MAX   # clean-corpus-n.perl
    clusterformer-mt-prep split --every 23 IN TRAIN_OUT VALID_OUT            # awk NR%23
    clusterformer-mt-prep learn-bpe -s 10000 IN [IN ...] CODES                # learn_bpe.py on cat IN...
    clusterformer-mt-prep apply-bpe -c CODES [--workers N] IN OUT
    clusterformer-mt-prep spm-train --vocab-size 10000 IN [IN ...] MODEL_PREFIX
    clusterformer-mt-prep spm-encode -m MODEL.model IN OUT
    clusterformer-mt-prep detokenize --lang en IN OUT        # for sacrebleu on detokenised text
    clusterformer-mt-prep compound-split IN OUT              # the ##AT##-##AT## convention (WMT14 BLEU)
    clusterformer-mt-prep hyps-refs GENERATE_OUTPUT HYP REF [SRC]  # H-/T-/S- lines sorted by id

IN/OUT may be ``-`` (stdin/stdout); ``.gz`` inputs are read transparently. Files are written to
``OUT.tmp`` and renamed when complete, so a killed step never leaves a half-written output that
looks finished.
"""

import argparse
import gzip
import io
import multiprocessing
import os
import re
import sys
from contextlib import contextmanager
from itertools import islice
from pathlib import Path

# --------------------------------------------------------------------------------------- I/O


def open_text(path):
    """Lines of a text file (or '-' for stdin, or a .gz file), newline stripped."""
    if str(path) == "-":
        stream = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", newline="\n")
    elif str(path).endswith(".gz"):
        stream = gzip.open(path, "rt", encoding="utf-8", newline="\n")
    else:
        stream = open(path, encoding="utf-8", newline="\n")
    with stream:
        for line in stream:
            yield line[:-1] if line.endswith("\n") else line


def read_lines(path):
    return list(open_text(path))


@contextmanager
def atomic_writer(path):
    """Write to PATH.tmp, rename to PATH on success (stdout when path is '-')."""
    if str(path) == "-":
        out = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="\n")
        yield out
        out.flush()
        out.detach()
        return
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as out:
        yield out
    os.replace(tmp, path)


def write_lines(path, lines):
    n = 0
    with atomic_writer(path) as out:
        for line in lines:
            out.write(line + "\n")
            n += 1
    return n


# ------------------------------------------------------------------------- markup extraction

_SEG_OPEN = re.compile(r'<seg id="[0-9]*">\s*')
_SEG_CLOSE = re.compile(r"\s*</seg>\s*")


def xml_segs(lines):
    """IWSLT dev/test XML and WMT SGML, as fairseq's pipeline does it::

    grep '<seg id' $o | sed -e 's/<seg id="[0-9]*">\\s*//g' | sed -e 's/\\s*<\\/seg>\\s*//g' |
    sed -e "s/\\’/\\'/g"
    """
    for line in lines:
        if "<seg id" not in line:
            continue
        line = _SEG_OPEN.sub("", line)
        line = _SEG_CLOSE.sub("", line)
        yield line.replace("\u2019", "'")


_TRAIN_DROP = ("<url>", "<talkid>", "<keywords>")
_TRAIN_UNTAG = ("<title>", "</title>", "<description>", "</description>")


def train_tags(lines):
    """IWSLT ``train.tags.*``, as fairseq's pipeline does it::

    grep -v '<url>' | grep -v '<talkid>' | grep -v '<keywords>' |
    sed -e 's/<title>//g' | sed -e 's/<\\/title>//g' |
    sed -e 's/<description>//g' | sed -e 's/<\\/description>//g'
    """
    for line in lines:
        if any(tag in line for tag in _TRAIN_DROP):
            continue
        for tag in _TRAIN_UNTAG:
            line = line.replace(tag, "")
        yield line


# ------------------------------------------------------------------------------ tokenisation

_WORKER = {}


def _moses_tokenizer(lang):
    """sacremoses' MosesTokenizer plus one rule of today's tokenizer.perl that sacremoses 0.x
    lacks: the last word of a line ending in a period is always split ("split last words
    independently as they are unlikely to be non-breaking prefixes"), so "... in the u.s." ends
    in "u.s ." as in the reference IWSLT14 data, not "u.s."."""
    from sacremoses import MosesTokenizer

    class Tokenizer(MosesTokenizer):
        def handles_nonbreaking_prefixes(self, text):
            # sacremoses' method with the is-last-token rule first, as in tokenizer.perl.
            tokens = text.split()
            n = len(tokens)
            for i, token in enumerate(tokens):
                m = re.search(r"^(\S+)\.$", token)
                if not m:
                    continue
                prefix = m.group(1)
                if i == n - 1:
                    tokens[i] = prefix + " ."
                elif (
                    ("." in prefix and self.isanyalpha(prefix))
                    or (prefix in self.NONBREAKING_PREFIXES and prefix not in self.NUMERIC_ONLY_PREFIXES)
                    or (tokens[i + 1] and self.islower(tokens[i + 1][0]))
                ):
                    pass
                elif prefix in self.NUMERIC_ONLY_PREFIXES and re.search(r"^[0-9]+", tokens[i + 1]):
                    pass
                else:
                    tokens[i] = prefix + " ."
            return " ".join(tokens)

    return Tokenizer(lang=lang)


def _init_tokenizer(lang, aggressive_dash, lowercase, normalize_punct, remove_non_printing):
    from sacremoses import MosesPunctNormalizer

    _WORKER.clear()
    _WORKER.update(
        tok=_moses_tokenizer(lang),
        norm=MosesPunctNormalizer(lang=lang) if normalize_punct else None,
        aggressive_dash=aggressive_dash,
        lowercase=lowercase,
        remove_non_printing=remove_non_printing,
    )


def _nonprinting_re():
    import regex

    return regex.compile(r"\p{C}")


_NONPRINTING = None


def remove_non_printing(line):
    """Moses ``remove-non-printing-char.perl``: every \\p{C} character becomes a space."""
    global _NONPRINTING
    if _NONPRINTING is None:
        _NONPRINTING = _nonprinting_re()
    return _NONPRINTING.sub(" ", line)


def _tokenize_one(line):
    w = _WORKER
    if w["norm"] is not None:
        line = w["norm"].normalize(line)
    if w["remove_non_printing"]:
        line = remove_non_printing(line)
    out = w["tok"].tokenize(line, aggressive_dash_splits=w["aggressive_dash"], return_str=True, escape=True)
    # tokenizer.perl squeezes and strips whitespace; sacremoses does too, this makes it certain.
    out = " ".join(out.split())
    return out.lower() if w["lowercase"] else out


def _tokenize_chunk(lines):
    return [_tokenize_one(line) for line in lines]


def _chunks(iterable, size):
    it = iter(iterable)
    while True:
        chunk = list(islice(it, size))
        if not chunk:
            return
        yield chunk


def _parallel(fn, lines, workers, chunk_size, initializer, initargs):
    """Order-preserving map of FN over chunks of LINES in WORKERS processes, reading the input
    a bounded number of chunks ahead (a 4.5M-line corpus is never held in memory)."""
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(workers, initializer=initializer, initargs=initargs) as pool:
        chunks = _chunks(lines, chunk_size)
        while True:
            block = list(islice(chunks, 4 * workers))
            if not block:
                return
            for chunk in pool.imap(fn, block):
                yield from chunk


def tokenize(
    lines,
    lang,
    lowercase=False,
    aggressive_dash=False,
    normalize_punct=False,
    remove_non_printing=False,
    workers=1,
    chunk_size=2000,
):
    """Moses ``tokenizer.perl -l LANG [-a]`` (optionally preceded by ``normalize-punctuation.perl
    LANG`` and ``remove-non-printing-char.perl``, followed by ``lowercase.perl``), line by line,
    in order. ``workers`` > 1 tokenises chunks in parallel processes (like ``-threads``)."""
    init = (lang, aggressive_dash, lowercase, normalize_punct, remove_non_printing)
    if workers <= 1:
        _init_tokenizer(*init)
        for line in lines:
            yield _tokenize_one(line)
        return
    yield from _parallel(_tokenize_chunk, lines, workers, chunk_size, _init_tokenizer, init)


def lowercase(lines):
    """Moses ``lowercase.perl`` (Perl ``lc`` on UTF-8 text)."""
    for line in lines:
        yield line.lower()


def detokenize(lines, lang):
    """Moses ``detokenizer.perl -l LANG`` (unescapes &apos; and friends too)."""
    from sacremoses import MosesDetokenizer

    detok = MosesDetokenizer(lang=lang)
    for line in lines:
        yield detok.detokenize(line.split(), return_str=True, unescape=True)


# ------------------------------------------------------------------------- corpus cleaning


def _squeeze(line):
    # clean-corpus-n.perl: s/\|//g (unfactored); s/\s+/ /g; s/^ //; s/ $//
    line = line.replace("|", "")
    return re.sub(r"\s+", " ", line).strip(" ")


def clean_pairs(pairs, ratio=9.0, min_len=1, max_len=175):
    """Moses ``clean-corpus-n.perl -ratio R CORPUS L1 L2 OUT MIN MAX`` on (l1, l2) line pairs:
    squeeze whitespace, then drop a pair if either side is empty, has fewer than MIN or more than
    MAX words, or the ratio of their word counts exceeds R."""
    for a, b in pairs:
        a, b = _squeeze(a), _squeeze(b)
        if not a or not b:
            continue
        na, nb = len(a.split(" ")), len(b.split(" "))
        if na > max_len or nb > max_len or na < min_len or nb < min_len:
            continue
        if na / nb > ratio or nb / na > ratio:
            continue
        yield a, b


def _paired(path_a, path_b):
    """Zip two files line by line; fail if their lengths differ."""
    a_it, b_it = open_text(path_a), open_text(path_b)
    for a in a_it:
        b = next(b_it, None)
        if b is None:
            raise ValueError(f"{path_b} has fewer lines than {path_a}")
        yield a, b
    if next(b_it, None) is not None:
        raise ValueError(f"{path_a} has fewer lines than {path_b}")


def clean_corpus(prefix, l1, l2, out_prefix, min_len, max_len, ratio):
    """File version of :func:`clean_pairs`: reads PREFIX.L1/PREFIX.L2, writes OUT_PREFIX.L1/.L2
    (streaming). Returns (lines read, lines kept)."""
    counts = [0, 0]

    def counted():
        for pair in _paired(f"{prefix}.{l1}", f"{prefix}.{l2}"):
            counts[0] += 1
            yield pair

    with atomic_writer(f"{out_prefix}.{l1}") as out_a, atomic_writer(f"{out_prefix}.{l2}") as out_b:
        for a, b in clean_pairs(counted(), ratio, min_len, max_len):
            out_a.write(a + "\n")
            out_b.write(b + "\n")
            counts[1] += 1
    return counts[0], counts[1]


def split_every(lines, every):
    """awk '{if (NR%EVERY == 0) print}' -> valid, the rest -> train. Returns (train, valid)."""
    train, valid = [], []
    for i, line in enumerate(lines, start=1):
        (valid if i % every == 0 else train).append(line)
    return train, valid


def split_every_file(path, every, train_out, valid_out):
    """Streaming :func:`split_every` on files. Returns (train lines, valid lines)."""
    n = [0, 0]
    with atomic_writer(train_out) as train, atomic_writer(valid_out) as valid:
        for i, line in enumerate(open_text(path), start=1):
            if i % every == 0:
                valid.write(line + "\n")
                n[1] += 1
            else:
                train.write(line + "\n")
                n[0] += 1
    return n[0], n[1]


# ------------------------------------------------------------------------------------- BPE


def learn_bpe(inputs, codes_path, symbols, min_frequency=2):
    """``learn_bpe.py -s SYMBOLS < cat(INPUTS) > CODES`` (subword-nmt)."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # subword-nmt draws a progress bar per merge
    from subword_nmt.learn_bpe import learn_bpe as _learn

    def all_lines():
        for path in inputs:
            for line in open_text(path):
                yield line + "\n"

    codes_path = Path(codes_path)
    tmp = codes_path.with_name(codes_path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        _learn(
            all_lines(), out, symbols, min_frequency=min_frequency, verbose=False, is_dict=False, total_symbols=False
        )
    os.replace(tmp, codes_path)


_BPE = {}


def _init_bpe(codes_path):
    from subword_nmt.apply_bpe import BPE

    with open(codes_path, encoding="utf-8") as codes:
        _BPE["bpe"] = BPE(codes, separator="@@")


def _bpe_chunk(lines):
    bpe = _BPE["bpe"]
    return [bpe.process_line(line) for line in lines]


def apply_bpe(lines, codes_path, workers=1, chunk_size=2000):
    """``apply_bpe.py -c CODES`` (subword-nmt, separator @@), line by line, in order."""
    if workers <= 1:
        _init_bpe(codes_path)
        for chunk in _chunks(lines, chunk_size):
            yield from _bpe_chunk(chunk)
        return
    yield from _parallel(_bpe_chunk, lines, workers, chunk_size, _init_bpe, (str(codes_path),))


# ---------------------------------------------------------------------------- sentencepiece


def spm_train(
    inputs,
    model_prefix,
    vocab_size,
    model_type="bpe",
    character_coverage=1.0,
    input_sentence_size=2_000_000,
    num_threads=None,
):
    """Train a sentencepiece model on the (already tokenised) INPUTS, jointly for both languages.
    Writes MODEL_PREFIX.model and MODEL_PREFIX.vocab."""
    import sentencepiece as spm

    prefix = Path(model_prefix)
    tmp_prefix = prefix.with_name(prefix.name + ".tmp")
    spm.SentencePieceTrainer.train(
        input=",".join(str(p) for p in inputs),
        model_prefix=str(tmp_prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,
    )
    for ext in (".vocab", ".model"):  # .model last: its presence marks the step complete
        os.replace(f"{tmp_prefix}{ext}", f"{prefix}{ext}")


def spm_encode(lines, model_path):
    """Sentencepiece pieces, space-separated (fairseq: ``--remove-bpe sentencepiece`` undoes it)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    for line in lines:
        yield " ".join(sp.encode(line, out_type=str))


def spm_decode(lines):
    """What fairseq's ``--remove-bpe sentencepiece`` does."""
    for line in lines:
        yield line.replace(" ", "").replace("\u2581", " ").strip()


def remove_bpe(lines, marker="@@ "):
    """What fairseq's ``--remove-bpe`` (subword-nmt '@@ ') does."""
    for line in lines:
        yield (line + " ").replace(marker, "").rstrip()


# ---------------------------------------------------------------------------------- scoring

_COMPOUND = re.compile(r"(\S)-(\S)")


def compound_split(line):
    """The tensor2tensor/fairseq WMT14 en-de BLEU convention (``compound_split_bleu.sh``)::

        perl -ple 's{(\\S)-(\\S)}{$1 ##AT##-##AT## $2}g'

    applied to both hypothesis and reference before tokenised BLEU."""
    return _COMPOUND.sub(r"\1 ##AT##-##AT## \2", line)


def parse_generate(lines):
    """fairseq-generate output -> dicts id -> text for S-, T-, H- and D- lines (H/D: the text,
    without the score column). Hydra's warnings and other lines are ignored."""
    out = {"S": {}, "T": {}, "H": {}, "D": {}}
    for line in lines:
        m = re.match(r"^([STHD])-(\d+)\t(.*)$", line)
        if not m:
            continue
        kind, idx, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind in "HD":
            rest = rest.split("\t", 1)[1] if "\t" in rest else ""
        # keep the first hypothesis per id (the best one with --nbest > 1)
        out[kind].setdefault(idx, rest)
    return out


# ------------------------------------------------------------------------------------- CLI


def _cli(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("xml-segs", help="IWSLT dev/test XML or WMT SGML -> one segment a line")
    s.add_argument("input"), s.add_argument("output")
    s = sub.add_parser("train-tags", help="IWSLT train.tags.* -> text lines")
    s.add_argument("input"), s.add_argument("output")

    s = sub.add_parser("tokenize", help="Moses tokenizer (sacremoses)")
    s.add_argument("--lang", required=True)
    s.add_argument("--lowercase", action="store_true")
    s.add_argument("--aggressive-dash", "-a", action="store_true")
    s.add_argument("--normalize-punct", action="store_true")
    s.add_argument("--remove-non-printing", action="store_true")
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("input", nargs="+", help="one or more inputs (concatenated), then OUT")

    s = sub.add_parser("lowercase")
    s.add_argument("input"), s.add_argument("output")
    s = sub.add_parser("detokenize", help="Moses detokenizer (sacremoses)")
    s.add_argument("--lang", required=True)
    s.add_argument("input"), s.add_argument("output")

    s = sub.add_parser("clean", help="Moses clean-corpus-n.perl")
    s.add_argument("--ratio", type=float, default=9.0)
    for name in ("prefix", "l1", "l2", "out_prefix"):
        s.add_argument(name)
    s.add_argument("min_len", type=int), s.add_argument("max_len", type=int)

    s = sub.add_parser("split", help="every N-th line to valid, the rest to train")
    s.add_argument("--every", type=int, required=True)
    s.add_argument("input"), s.add_argument("train_out"), s.add_argument("valid_out")

    s = sub.add_parser("learn-bpe", help="subword-nmt learn_bpe on the concatenated inputs")
    s.add_argument("-s", "--symbols", type=int, required=True)
    s.add_argument("--min-frequency", type=int, default=2)
    s.add_argument("input", nargs="+", help="inputs, then the codes file")
    s = sub.add_parser("apply-bpe", help="subword-nmt apply_bpe")
    s.add_argument("-c", "--codes", required=True)
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("input"), s.add_argument("output")

    s = sub.add_parser("spm-train", help="sentencepiece model on the inputs (joint)")
    s.add_argument("--vocab-size", type=int, required=True)
    s.add_argument("--model-type", default="bpe")
    s.add_argument("--input-sentence-size", type=int, default=2_000_000)
    s.add_argument("input", nargs="+", help="inputs, then the model prefix")
    s = sub.add_parser("spm-encode")
    s.add_argument("-m", "--model", required=True)
    s.add_argument("input"), s.add_argument("output")

    s = sub.add_parser("compound-split", help="a-b -> a ##AT##-##AT## b (WMT14 BLEU convention)")
    s.add_argument("input"), s.add_argument("output")
    s = sub.add_parser("remove-bpe", help="undo BPE: '@@ ' (default) or 'sentencepiece'")
    s.add_argument("--kind", default="subword_nmt", choices=("subword_nmt", "sentencepiece"))
    s.add_argument("input"), s.add_argument("output")

    s = sub.add_parser("hyps-refs", help="fairseq-generate output -> hyp/ref (/src) files by id")
    s.add_argument("--expect", type=int, help="fail unless exactly this many hypotheses")
    s.add_argument("generate_output"), s.add_argument("hyp"), s.add_argument("ref")
    s.add_argument("src", nargs="?")

    a = p.parse_args(argv)
    log = lambda msg: print(f"[mt_prep] {msg}", file=sys.stderr)  # noqa: E731

    if a.cmd == "xml-segs":
        n = write_lines(a.output, xml_segs(open_text(a.input)))
    elif a.cmd == "train-tags":
        n = write_lines(a.output, train_tags(open_text(a.input)))
    elif a.cmd == "tokenize":
        if len(a.input) < 2:
            p.error("tokenize needs at least one input and an output")
        *ins, out = a.input

        def lines():
            for path in ins:
                yield from open_text(path)

        n = write_lines(
            out,
            tokenize(
                lines(),
                a.lang,
                lowercase=a.lowercase,
                aggressive_dash=a.aggressive_dash,
                normalize_punct=a.normalize_punct,
                remove_non_printing=a.remove_non_printing,
                workers=a.workers,
            ),
        )
        a.output = out
    elif a.cmd == "lowercase":
        n = write_lines(a.output, lowercase(open_text(a.input)))
    elif a.cmd == "detokenize":
        n = write_lines(a.output, detokenize(open_text(a.input), a.lang))
    elif a.cmd == "clean":
        read, kept = clean_corpus(a.prefix, a.l1, a.l2, a.out_prefix, a.min_len, a.max_len, a.ratio)
        log(f"clean: input {read} lines, output {kept} lines -> {a.out_prefix}.{{{a.l1},{a.l2}}}")
        return 0
    elif a.cmd == "split":
        n_train, n_valid = split_every_file(a.input, a.every, a.train_out, a.valid_out)
        log(f"split: {n_train} train lines -> {a.train_out}, {n_valid} valid lines -> {a.valid_out}")
        return 0
    elif a.cmd == "learn-bpe":
        if len(a.input) < 2:
            p.error("learn-bpe needs at least one input and the codes file")
        *ins, codes = a.input
        learn_bpe(ins, codes, a.symbols, a.min_frequency)
        log(f"learn-bpe: {a.symbols} merges -> {codes}")
        return 0
    elif a.cmd == "apply-bpe":
        n = write_lines(a.output, apply_bpe(open_text(a.input), a.codes, workers=a.workers))
    elif a.cmd == "spm-train":
        if len(a.input) < 2:
            p.error("spm-train needs at least one input and the model prefix")
        *ins, prefix = a.input
        spm_train(ins, prefix, a.vocab_size, a.model_type, input_sentence_size=a.input_sentence_size)
        log(f"spm-train: vocabulary {a.vocab_size} -> {prefix}.model")
        return 0
    elif a.cmd == "spm-encode":
        n = write_lines(a.output, spm_encode(open_text(a.input), a.model))
    elif a.cmd == "compound-split":
        n = write_lines(a.output, (compound_split(x) for x in open_text(a.input)))
    elif a.cmd == "remove-bpe":
        fn = spm_decode if a.kind == "sentencepiece" else remove_bpe
        n = write_lines(a.output, fn(open_text(a.input)))
    elif a.cmd == "hyps-refs":
        parsed = parse_generate(open_text(a.generate_output))
        ids = sorted(parsed["H"])
        if a.expect is not None:
            missing = sorted(set(range(a.expect)) - set(ids))
            if len(ids) != a.expect or missing:
                log(
                    f"ERROR: {len(ids)} hypotheses in {a.generate_output}, expected {a.expect}"
                    f" (missing ids: {missing[:20]}{' ...' if len(missing) > 20 else ''})"
                )
                return 1
        write_lines(a.hyp, (parsed["H"][i] for i in ids))
        write_lines(a.ref, (parsed["T"].get(i, "") for i in ids))
        if a.src:
            write_lines(a.src, (parsed["S"].get(i, "") for i in ids))
        n = len(ids)
        a.output = a.hyp
    else:  # pragma: no cover
        p.error(a.cmd)
    if getattr(a, "output", "-") != "-":
        log(f"{a.cmd}: {n} lines -> {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
