"""What the benchmarks (scripts/*.py) and the experiments (scripts/experiments/) share.

Generated blocks. A document's tables that are rebuilt from committed raw results sit between an
opening marker ``<!-- BEGIN GENERATED <tag> -->`` and a closing marker ``<!-- END GENERATED -->``
(or ``<!-- END GENERATED <tag> -->``, repeating the tag); the text around them is written by
hand and left alone. :func:`generated_blocks` finds them and :func:`rewrite_generated` replaces
their bodies; each tool reads its own tags (docs/benchmarks.md: a table name, such as ``train``;
docs/results.md: ``by python -m scripts.experiments.run_side_by_side report from <raw results>``).

Peak memory. :class:`CpuPeak` measures the extra resident memory of a block of code in this
process (the attention benchmarks and the profiler); the peak of another process (a fairseq-train
run of the experiments, or of clusterformer-choose-k) comes from the product's runner,
:func:`fairseq_clusterformer.tools.runs.run_measured` (``/usr/bin/time -v``, else
:class:`PeakRssPoller`), re-exported here so that every meter of the harness is reached from
this module.
"""

import re
from typing import NamedTuple

# the product's meters of another process, re-exported (imported on first use: importing the
# package imports fairseq, which a table rebuild or a benchmark worker need not pay for)
_FROM_RUNS = ("PeakRssPoller", "run_measured", "time_v_peak_mb")


def __getattr__(name):
    if name in _FROM_RUNS:
        from fairseq_clusterformer.tools import runs

        return getattr(runs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------ generated blocks

_BLOCK = re.compile(
    r"(?P<begin><!-- BEGIN GENERATED (?P<tag>[^\n]*?) -->)(?P<body>.*?)"
    r"(?P<end><!-- END GENERATED(?: (?P<end_tag>[^\n]*?))? -->)",
    re.S,
)


class GeneratedBlockError(ValueError):
    pass


class GeneratedBlock(NamedTuple):
    tag: str  # what the opening marker says after "BEGIN GENERATED"
    begin: str  # the opening marker, verbatim
    body: str  # the text between the markers
    end: str  # the closing marker, verbatim
    start: int  # offsets of the whole block (markers included) in the text
    stop: int


def generated_blocks(text):
    """The generated blocks of TEXT, in order. A closing marker that names another block than the
    one it closes is an error (GeneratedBlockError)."""
    blocks = []
    for m in _BLOCK.finditer(text):
        if m.group("end_tag") is not None and m.group("end_tag") != m.group("tag"):
            line = text.count("\n", 0, m.start("end")) + 1
            raise GeneratedBlockError(
                f"line {line}: {m.group('end')!r} closes the block opened by {m.group('begin')!r}"
            )
        blocks.append(GeneratedBlock(m.group("tag"), m.group("begin"), m.group("body"), m.group("end"), *m.span()))
    return blocks


def rewrite_generated(text, bodies):
    """TEXT with the body of each generated block replaced: BODIES maps a block to its new body,
    as a dict from tag to text or a function of the GeneratedBlock (None: leave the block as it
    is). A new body sits on the lines between the markers, which are kept verbatim."""
    blocks = generated_blocks(text)
    out, at = [], 0
    for block in blocks:
        body = bodies.get(block.tag) if isinstance(bodies, dict) else bodies(block)
        if body is None:
            continue
        out += [text[at : block.start], block.begin, "\n", body, "\n", block.end]
        at = block.stop
    return "".join(out) + text[at:]


# ---------------------------------------------------------------------------------- peak memory


def proc_status(field):
    """A field of /proc/self/status in bytes (VmRSS, VmHWM, VmSize)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB -> bytes
    raise KeyError(field)


class CpuPeak:
    """Extra resident memory of a block of code in this process: peak RSS during it minus RSS
    before it (``start()`` ... ``stop()``, in bytes). ``method``: "vmhwm" (the high-water mark,
    reset through /proc/self/clear_refs) or "ru_maxrss" (where it cannot be reset: fair only in a
    fresh process)."""

    def __init__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "vmhwm"
        except OSError:  # no clear_refs: ru_maxrss cannot be reset; a fresh process keeps it fair
            self.method = "ru_maxrss"

    def _peak(self):
        if self.method == "vmhwm":
            return proc_status("VmHWM")
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def start(self):
        if self.method == "vmhwm":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the high-water mark to the current RSS
            self.base = proc_status("VmRSS")
        else:
            self.base = self._peak()

    def stop(self):
        return max(self._peak() - self.base, 0)
