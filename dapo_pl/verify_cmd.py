"""``dapo-pl verify`` and ``dapo-pl verifiers``: score a JSONL file offline with the training verifiers.

    dapo-pl verify --verifier math_equivalence [--verifier overlong] --input IN.jsonl --output OUT.jsonl
    dapo-pl verifiers

``verify`` reads one JSON object per line with ``response`` and ``reference`` (optional ``prompt``,
``response_length``, ``max_response_length``, ``truncated``; every other field passes through) and writes each
line back, in order, with ``reward`` (float, summed over the verifiers), ``correct`` (bool or null),
``extracted`` (string or null) and ``error`` (string or null). As in training, the first verifier decides
``correct`` and ``extracted``; the others only add shaping rewards. Lines go through the verifiers in batches,
the same batched, parallel path the trainer uses, so a slow line costs at most the verifier's own time limit.

Any bytes are accepted and nothing is lost: input line i gives output line i. A line that cannot be scored (not
UTF-8, not JSON, not an object, a lone surrogate escape such as ``"\\ud800"``, no text ``response``, a field of
the wrong type such as a non-numeric ``response_length``, or a blank line) is written through with ``reward``
0.0, ``correct`` null and ``error`` naming the file, the line number and the problem (a line that is not a JSON
object is kept as text under ``_raw``). A verifier that raises or exceeds ``--timeout-s`` on a batch does not stop the
run either: that batch's lines count as wrong (``correct`` false from the first verifier) with ``error`` naming
the verifier and its plugin. The summary counts both kinds.

``--output`` is written to a temporary file in the same folder and renamed over OUT at the end, so an interrupted
run never leaves a half-written OUT; an ``--output`` that is the ``--input`` file (also through a link) is refused.
Exit status: 0 when every line was written (bad lines included), 2 for a usage error (unknown verifier, bad
options, output = input), 1 when a file cannot be read or written.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from typing import IO, Any

from dapo_pl.rewards import failed_verdict, total_reward
from dapo_pl.verification import (
    DEFAULT_TIMEOUT_S,
    PLUGINS_ENV,
    Sample,
    Verdict,
    VerifierError,
    available_verifiers,
    build_verifier,
)

_SAMPLE_FIELDS = ("prompt", "response_length", "max_response_length", "truncated")


# ------------------------------------------------------------------ parsers


def add_verify_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``verify`` subcommand to an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "verify",
        help="score a JSONL file of responses with verifier plugins",
        description=__doc__.split("\n\n")[2] if __doc__ else None,
    )
    p.add_argument(
        "--verifier",
        action="append",
        required=True,
        metavar="NAME",
        help="verifier to apply (repeatable); the first decides `correct`, the others add rewards",
    )
    p.add_argument("--input", required=True, metavar="IN.jsonl", help="input JSONL ('-' for stdin)")
    p.add_argument("--output", required=True, metavar="OUT.jsonl", help="output JSONL ('-' for stdout)")
    p.add_argument(
        "--options",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="options of one verifier as a JSON object, e.g. math_equivalence='{\"timeout_s\": 2}'",
    )
    p.add_argument("--batch-size", type=int, default=256, help="lines per verifier call (default 256)")
    p.add_argument(
        "--timeout-s",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds one verifier may take per batch; past it the batch's lines get `error` and count as "
        f"wrong (default {DEFAULT_TIMEOUT_S:g}; 0: no limit)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_verify)
    return p  # fmt: skip


def add_list_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``verifiers`` subcommand (list the discovered verifiers)."""
    p = subparsers.add_parser("verifiers", help="list the discovered verifier plugins")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_list)
    return p


# ------------------------------------------------------------------ verifiers list


def run_list(args: argparse.Namespace) -> int:
    """Print every discovered verifier: name, providing plugin (distribution), one-line description."""
    try:
        infos = available_verifiers()
    except VerifierError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = [(i.name, i.plugin, i.description) for i in sorted(infos.values(), key=lambda i: i.name)]
    if getattr(args, "json", False):
        print(json.dumps([{"name": n, "plugin": p, "description": d} for n, p, d in rows], indent=2))
        return 0
    if not rows:
        print(f"no verifiers found ({PLUGINS_ENV}={os.environ.get(PLUGINS_ENV)!r})")
        return 0
    width = [max(len(r[k]) for r in rows + [("NAME", "PLUGIN", "")]) for k in range(2)]
    print(f"{'NAME':{width[0]}}  {'PLUGIN':{width[1]}}  DESCRIPTION")
    for name, plugin, desc in rows:
        print(f"{name:{width[0]}}  {plugin:{width[1]}}  {desc}")
    return 0


# ------------------------------------------------------------------ verify


@dataclass
class _Line:
    """One input line: the record to write back, and the sample to score (None for a bad line)."""

    record: dict[str, Any]
    sample: Sample | None
    error: str | None = None


@dataclass
class _Summary:
    lines: int = 0
    bad: int = 0
    judged: int = 0
    correct: int = 0
    reward: float = 0.0
    verifier_errors: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def add(self, line: _Line, out: dict[str, Any]) -> None:
        self.lines += 1
        if line.sample is None:
            self.bad += 1
            self.errors[_kind(line.error or "")] += 1
            return
        if out["correct"] is not None:
            self.judged += 1
            self.correct += bool(out["correct"])
        self.reward += out["reward"]
        if out["error"]:
            self.verifier_errors += 1
            self.errors[out["error"].split(":")[0][:60]] += 1

    def text(self, seconds: float) -> str:
        acc = f"{100 * self.correct / self.judged:.1f}%" if self.judged else "n/a"
        scored = self.lines - self.bad
        rate = f"{self.lines / seconds:.1f} lines/s" if seconds > 0 else ""
        parts = [
            f"verified {self.lines} lines in {seconds:.2f} s ({rate})",
            f"  correct {self.correct} / judged {self.judged} (accuracy {acc}); "
            f"mean reward {self.reward / scored if scored else 0.0:.4f}",
            f"  lines with an error: {self.bad + self.verifier_errors} (bad input lines: {self.bad}; "
            f"lines a verifier could not judge: {self.verifier_errors})",
        ]
        parts += [f"    {n:6d}  {kind}" for kind, n in self.errors.most_common(8)]
        return "\n".join(parts)


def _kind(error: str) -> str:
    """The kind of a bad-line error, without its ``file:line:`` prefix and details."""
    return re.sub(r"^.*?:\d+: ", "", error).split(" (")[0][:60]


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "prompt": (str,),
    "response_length": (int,),
    "max_response_length": (int,),
    "truncated": (bool,),
}


def _field_problem(obj: dict[str, Any]) -> str | None:
    """What is wrong with the optional sample fields of ``obj`` (None: nothing)."""
    for name, types in _FIELD_TYPES.items():
        value = obj.get(name)
        if value is None:
            continue
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            want = " or ".join(
                "an integer" if t is int else "a string" if t is str else "true/false" for t in types
            )
            return f"field {name!r} must be {want} (or null), not {json.dumps(value)[:40]}"
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            return f"field {name!r} must be >= 0, not {value}"
    return None


def _object(text: str, where: str) -> tuple[Any, str | None]:
    """The JSON value of one line, or the error that says why there is none."""
    if not text.strip():
        return None, f"{where}: blank line"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"{where}: not valid JSON ({exc.msg} at column {exc.colno})"
    except RecursionError:
        return None, f"{where}: not valid JSON (nested too deeply)"
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = f"\\u{ord(exc.object[exc.start]):04x}"
        return None, f"{where}: contains a lone surrogate escape {bad}, which is not valid Unicode"
    return obj, None


def _parse_line(raw: bytes, where: str) -> _Line:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        kept = raw.decode("utf-8", errors="backslashreplace").rstrip("\r\n")
        return _Line(
            {"_raw": kept}, None, f"{where}: not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        )
    obj, error = _object(text, where)
    if error is not None:
        return _Line({"_raw": text.rstrip("\r\n")}, None, error)
    if not isinstance(obj, dict):
        return _Line({"_raw": obj}, None, f"{where}: expected a JSON object, got {type(obj).__name__}")
    response = obj.get("response")
    if not isinstance(response, str):
        what = "is missing" if "response" not in obj else f"must be a string, not {type(response).__name__}"
        return _Line(obj, None, f"{where}: field 'response' {what}")
    reference = obj.get("reference")
    if reference is not None and not isinstance(reference, (str, int, float)):
        return _Line(
            obj, None, f"{where}: field 'reference' must be text or a number, not {type(reference).__name__}"
        )
    problem = _field_problem(obj)
    if problem is not None:
        return _Line(obj, None, f"{where}: {problem}")
    extra = {k: obj[k] for k in _SAMPLE_FIELDS if obj.get(k) is not None}
    sample = Sample(response, None if reference is None else str(reference), **extra, metadata=obj)
    return _Line(obj, sample)


def _read(stream: IO[bytes], name: str) -> Iterator[_Line]:
    """One :class:`_Line` per input line (split on ``\\n`` only, as ``wc -l`` counts), blank lines included."""
    for number, raw in enumerate(stream, start=1):
        yield _parse_line(raw, f"{name}:{number}")


def _combine(verdicts: Sequence[Verdict]) -> dict[str, Any]:
    """The first verdict decides correct/extracted; rewards add up; errors are joined."""
    first = verdicts[0]
    errors = [v.error for v in verdicts if v.error]
    return {
        "reward": total_reward(verdicts),
        "correct": first.correct,
        "extracted": first.extracted,
        "error": "; ".join(errors) if errors else None,
    }


def _score(batch: list[_Line], verifiers: list[Any]) -> list[dict[str, Any]]:
    good = [line for line in batch if line.sample is not None]
    samples = [line.sample for line in good]
    # the guarded call shared with training: a raising or hung verifier gives its lines `error`, not a crash
    per_verifier = (
        [v.score(samples, failed_verdict(i == 0))[0] for i, v in enumerate(verifiers)] if samples else []
    )
    combined = iter([_combine(vs) for vs in zip(*per_verifier, strict=True)])
    out = []
    for line in batch:
        if line.sample is None:
            out.append({"reward": 0.0, "correct": None, "extracted": None, "error": line.error})
        else:
            out.append(next(combined))
    return out


def _batches(lines: Iterator[_Line], size: int) -> Iterator[list[_Line]]:
    batch: list[_Line] = []
    for line in lines:
        batch.append(line)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _options(raw: list[str], names: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in raw:
        name, sep, text = item.partition("=")
        if not sep or name not in names:
            raise VerifierError(f"--options {item!r}: expected NAME=JSON with NAME one of {names}")
        value = json.loads(text)
        if not isinstance(value, dict):
            raise VerifierError(f"--options {item!r}: the JSON must be an object")
        out[name] = value
    return out


def _count_lines(path: str) -> int | None:
    if path == "-":
        return None
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def _build(args: argparse.Namespace) -> list[Any]:
    try:
        options = _options(args.options, args.verifier)
    except json.JSONDecodeError as exc:
        raise VerifierError(f"--options: invalid JSON ({exc})") from exc
    timeout = args.timeout_s if args.timeout_s > 0 else None
    return [build_verifier(name, options.get(name), timeout_s=timeout) for name in args.verifier]


def _same_file(input_path: str, output_path: str) -> bool:
    """Whether OUT is IN itself (the same file also through a symlink or a hard link)."""
    if "-" in (input_path, output_path) or not os.path.exists(output_path) or not os.path.exists(input_path):
        return False
    return os.path.samefile(input_path, output_path)


def run_verify(args: argparse.Namespace) -> int:
    """Score ``args.input`` into ``args.output``; returns the exit status."""
    if args.batch_size < 1:
        print("error: --batch-size must be >= 1", file=sys.stderr)
        return 2
    if _same_file(args.input, args.output):
        print(
            f"error: --output {args.output} is the input file {args.input}: writing it would destroy the input; "
            "choose another output path",
            file=sys.stderr,
        )
        return 2
    try:
        verifiers = _build(args)
    except VerifierError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return _verify_files(args, verifiers)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for v in verifiers:
            close = getattr(getattr(v, "fn", v), "close", None)
            if callable(close):
                close()


@contextmanager
def _replaced_atomically(path: str) -> Iterator[IO[bytes]]:
    """A binary stream to a temporary file beside ``path`` (its link target, if it is a symlink), renamed over
    it once the block succeeds: an interrupted run leaves ``path`` as it was (and no temporary file when it
    could clean up)."""
    target = os.path.realpath(path)
    folder, name = os.path.split(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder or ".")
    try:
        with os.fdopen(fd, "wb") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(tmp, _mode_for(target))
        os.replace(tmp, target)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _mode_for(target: str) -> int:
    """Permissions for a new OUT: those of the file it replaces, else what ``open`` would give (umask)."""
    with suppress(FileNotFoundError):
        return stat.S_IMODE(os.stat(target).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _encode(record: dict[str, Any]) -> bytes:
    try:
        return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    except (
        UnicodeEncodeError
    ):  # a surrogate that came back from a verifier: escape it rather than lose the line
        return (json.dumps(record) + "\n").encode("ascii")


def _verify_files(args: argparse.Namespace, verifiers: list[Any]) -> int:
    from tqdm import tqdm

    start = time.perf_counter()
    summary = _Summary()
    total = _count_lines(args.input)
    with ExitStack() as stack:
        src = sys.stdin.buffer if args.input == "-" else stack.enter_context(open(args.input, "rb"))
        dst = (
            sys.stdout.buffer
            if args.output == "-"
            else stack.enter_context(_replaced_atomically(args.output))
        )
        bar = stack.enter_context(
            tqdm(
                total=total,
                unit="line",
                disable=args.no_progress or (total is not None and total < 1000),
                file=sys.stderr,
            )
        )
        name = "<stdin>" if args.input == "-" else args.input
        for batch in _batches(_read(src, name), args.batch_size):
            for line, out in zip(batch, _score(batch, verifiers), strict=True):
                dst.write(_encode({**line.record, **out}))
                summary.add(line, out)
            bar.update(len(batch))
    print(summary.text(time.perf_counter() - start), file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser with both subcommands (``python -m dapo_pl.verify_cmd``)."""
    parser = argparse.ArgumentParser(prog="dapo-pl", description="dapo-pl verification commands")
    sub = parser.add_subparsers(dest="command", required=True)
    add_verify_parser(sub)
    add_list_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
