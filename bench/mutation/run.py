"""
Mutation testing of the wire format, the session/UPDATE code and the SASL
mechanisms with cosmic-ray, on demand (never in CI: a full run takes the
better part of an hour on one core).

    .venv/bin/python bench/mutation/run.py [GROUP ...] [--workdir DIR]
        [--max-examples N] [--report] [--recheck] [--survivors]

GROUP is a ``*.toml`` beside this script (wire, session, sasl; default: all).
Mutants are made in a snapshot of the work tree (tracked and untracked, not
ignored, files) under ``--workdir``: cosmic-ray edits the module on disk for
each mutant, which must never happen in a tree that people and other test
runs use.  Mutants run one at a time, under ``nice``.

Each run ends with one line per module: mutants, killed (timeouts among
them), survived, equivalent (listed in ``equivalent.toml``, matched on the
original and mutated line, with the reason) and the score, killed / (mutants -
equivalent).  ``--report`` prints the table of an earlier run; ``--recheck``
makes the mutants of the current tree again but counts as killed, without
running them, those the last run killed (same change of the same lines), so
only its survivors and what code changes brought run (after adding tests);
``--survivors`` prints each unexplained survivor's diff.
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import toml
from cosmic_ray.mutating import _make_diff, mutate_code
from cosmic_ray.plugins import get_operator
from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkItem, WorkResult

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
ANNOTATION = "inside an annotation"
CARRIED = "killed in the previous run"
GROUPS = sorted(p.stem for p in HERE.glob("*.toml") if p.stem not in ("common", "equivalent"))


@dataclass
class Equivalent:
    module: str
    original: str
    mutated: str
    reason: str
    used: int = 0


@dataclass
class Row:
    total: int = 0
    killed: int = 0
    timeouts: int = 0
    survived: int = 0
    equivalent: int = 0
    annotations: int = 0
    pending: int = 0
    survivors: list[tuple[WorkItem, WorkResult]] = field(default_factory=list)

    @property
    def score(self) -> float:
        judged = self.total - self.equivalent - self.pending
        return 100.0 * self.killed / judged if judged else 100.0


def snapshot(dest: Path) -> None:
    """Copy the work tree's tracked and untracked (not ignored) files to C{dest}."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                           check=True, capture_output=True).stdout.split(b"\0")
    for raw in names:
        if not raw:
            continue
        name = raw.decode()
        src = REPO / name
        if not src.is_file():
            continue  # deleted in the work tree
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / name)


def group_config(group: str, workdir: Path) -> Path:
    """The group's config merged over common.toml, written into C{workdir}."""
    with open(HERE / "common.toml", "rb") as f:
        config = tomllib.load(f)
    with open(HERE / f"{group}.toml", "rb") as f:
        for key, value in tomllib.load(f)["cosmic-ray"].items():
            config["cosmic-ray"][key] = value
    path = workdir / f"{group}.toml"
    path.write_text(toml.dumps(config))
    return path


def environment(max_examples: int, nice: int) -> dict[str, str]:
    env = dict(os.environ)
    env["MUTATION_NICE"] = str(nice)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MUTATION_MAX_EXAMPLES"] = str(max_examples)
    return env


def cosmic(args: list[str], src: Path, env: dict[str, str]) -> None:
    bindir = Path(sys.executable).parent
    command = ["nice", "-n", env["MUTATION_NICE"], str(bindir / args[0]), *args[1:]]
    # the copy's popservice and tests, not the work tree's (the editable install's path)
    subprocess.run(command, cwd=src, env={**env, "PYTHONPATH": str(src)}, check=True)


def run_group(group: str, workdir: Path, env: dict[str, str], recheck: bool) -> None:
    src = workdir / f"src-{group}"
    snapshot(src)
    config = group_config(group, workdir)
    db = workdir / f"{group}.sqlite"
    previous = workdir / f"{group}.previous.sqlite"
    if recheck:
        db.replace(previous)
    elif db.exists():
        db.unlink()
    cosmic(["cosmic-ray", "--verbosity", "ERROR", "baseline", str(config)], src, env)
    cosmic(["cosmic-ray", "--verbosity", "ERROR", "init", str(config), str(db)], src, env)
    cosmic(["cr-filter-operators", str(db), str(config)], src, env)
    skip_annotations(db, src)
    if recheck:
        carry_over_kills(previous, db, src)
    cosmic(["cosmic-ray", "--verbosity", "ERROR", "exec", str(config), str(db)], src, env)


def mutant_key(module: str, operator: str, diff: str) -> tuple[str, str, str]:
    """A mutant's identity across runs: its module, operator and diff hunk without line numbers."""
    hunk = "\n".join(line for line in diff.splitlines() if not line.startswith(("---", "+++", "@@")))
    return module, operator, hunk


def carry_over_kills(previous: Path, db: Path, src: Path) -> None:
    """
    Mark as killed the mutants the previous run killed (the same change of the
    same lines, wherever they moved), so that C{--recheck} runs only its
    survivors and what the code changes since then brought.
    """
    killed: dict[tuple[str, str, str], WorkResult] = {}
    with use_db(str(previous), WorkDB.Mode.open) as old:
        for item, result in old.completed_work_items:
            if result.worker_outcome != WorkerOutcome.SKIPPED and result.test_outcome != TestOutcome.SURVIVED:
                mutation = item.mutations[0]
                key = mutant_key(str(mutation.module_path), mutation.operator_name, result.diff or "")
                killed[key] = result
    sources: dict[Path, str] = {}
    with use_db(str(db), WorkDB.Mode.open) as work_db:
        for item in list(work_db.pending_work_items):
            mutation = item.mutations[0]
            path = src / mutation.module_path
            code = sources.setdefault(path, path.read_text())
            operator = get_operator(mutation.operator_name)(**mutation.operator_args)
            try:
                mutated = mutate_code(code, operator, mutation.occurrence)
            except Exception:  # cosmic-ray's ExceptionReplacer fails on some nodes: let exec judge
                continue
            if mutated is None:
                continue
            diff = "\n".join(_make_diff(code, mutated, mutation.module_path))
            before = killed.get(mutant_key(str(mutation.module_path), mutation.operator_name, diff))
            if before is not None:
                work_db.set_result(item.job_id, WorkResult(
                    worker_outcome=WorkerOutcome.NORMAL, test_outcome=TestOutcome.KILLED, diff=diff,
                    output=CARRIED if before.output != "timeout" else "timeout"))


def annotation_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Where C{source}'s annotations are, as ((line, column), (end line, end column))."""
    spans = []
    for node in ast.walk(ast.parse(source)):
        found: list[ast.expr | None] = []
        if isinstance(node, ast.arg):
            found.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            found.append(node.annotation)
        for a in found:
            if a is not None and a.end_lineno is not None and a.end_col_offset is not None:
                spans.append(((a.lineno, a.col_offset), (a.end_lineno, a.end_col_offset)))
    return spans


def skip_annotations(db: Path, src: Path) -> None:
    """
    Mark as skipped the mutants inside annotations: every target module has
    C{from __future__ import annotations}, so they are strings nothing
    evaluates and such a mutant is equivalent by construction.
    """
    spans: dict[Path, list[tuple[tuple[int, int], tuple[int, int]]]] = {}
    with use_db(str(db), WorkDB.Mode.open) as work_db:
        for item in list(work_db.pending_work_items):
            mutation = item.mutations[0]
            path = src / mutation.module_path
            if path not in spans:
                source = path.read_text()
                future = "from __future__ import annotations" in source
                spans[path] = annotation_spans(source) if future else []
            start, end = tuple(mutation.start_pos), tuple(mutation.end_pos)
            if any(a <= start and end <= b for a, b in spans[path]):
                skipped = WorkResult(output=ANNOTATION, worker_outcome=WorkerOutcome.SKIPPED)
                work_db.set_result(item.job_id, skipped)


def load_equivalents() -> list[Equivalent]:
    with open(HERE / "equivalent.toml", "rb") as f:
        data = tomllib.load(f)
    return [Equivalent(e["module"], e["original"].strip(), e["mutated"].strip(), e["reason"])
            for e in data.get("mutant", [])]


def changed_lines(diff: str) -> tuple[str, str]:
    lines = [line for line in diff.splitlines() if not line.startswith(("---", "+++"))]
    old = [line[1:].strip() for line in lines if line.startswith("-") and line[1:].strip()]
    new = [line[1:].strip() for line in lines if line.startswith("+") and line[1:].strip()]
    return " ".join(old), " ".join(new)


def find_equivalent(module: str, diff: str, equivalents: list[Equivalent]) -> Equivalent | None:
    old, new = changed_lines(diff)
    for e in equivalents:
        if e.module == module and e.original == old and e.mutated == new:
            return e
    return None


def tabulate(group: str, workdir: Path, equivalents: list[Equivalent]) -> Iterator[tuple[str, Row]]:
    rows: dict[str, Row] = {}
    with use_db(str(workdir / f"{group}.sqlite"), WorkDB.Mode.open) as work_db:
        results = dict((item.job_id, (item, result)) for item, result in work_db.completed_work_items)
        for item in work_db.work_items:
            module = str(item.mutations[0].module_path)
            row = rows.setdefault(module, Row())
            if item.job_id not in results:
                row.total += 1
                row.pending += 1
                continue
            _, result = results[item.job_id]
            if result.worker_outcome == WorkerOutcome.SKIPPED:
                if result.output == ANNOTATION:
                    row.annotations += 1
                continue  # or an operator left out in common.toml
            row.total += 1
            if result.worker_outcome != WorkerOutcome.NORMAL or result.test_outcome != TestOutcome.SURVIVED:
                # killed by a test, a timeout, or a mutant that does not even import
                row.killed += 1
                if (result.output or "") == "timeout":
                    row.timeouts += 1
            elif (equivalent := find_equivalent(module, result.diff or "", equivalents)) is not None:
                row.equivalent += 1
                equivalent.used += 1
            else:
                row.survived += 1
                row.survivors.append((item, result))
    yield from sorted(rows.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("groups", nargs="*", metavar="GROUP", help=f"of {', '.join(GROUPS)} (default: all)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/popservice-mutation"))
    parser.add_argument("--max-examples", type=int, default=50,
                        help="cap on each hypothesis test's examples (0: the tests' own)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="groups run at the same time (each in its own copy)")
    parser.add_argument("--nice", type=int, default=10, help="niceness of the runs (default 10)")
    parser.add_argument("--report", action="store_true", help="only print the last run's table")
    parser.add_argument("--recheck", action="store_true", help="run only what the last run did not kill")
    parser.add_argument("--survivors", action="store_true", help="print the unexplained survivors' diffs")
    args = parser.parse_args()
    groups = args.groups or GROUPS
    unknown = set(groups) - set(GROUPS)
    if unknown:
        parser.error(f"unknown group(s) {', '.join(sorted(unknown))}; there are {', '.join(GROUPS)}")
    workdir: Path = args.workdir.resolve()
    if not args.report:
        workdir.mkdir(parents=True, exist_ok=True)
        env = environment(args.max_examples, args.nice)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for done in [pool.submit(run_group, g, workdir, env, args.recheck) for g in groups]:
                done.result()
    equivalents = load_equivalents()
    print(f"{'module':44} {'mutants':>7} {'killed':>6} {'timeout':>7} {'survived':>8} "
          f"{'equiv':>5} {'annot':>5} {'pending':>7} {'score':>6}")
    for group in groups:
        if not (workdir / f"{group}.sqlite").exists():
            continue
        for module, row in tabulate(group, workdir, equivalents):
            print(f"{module:44} {row.total:7} {row.killed:6} {row.timeouts:7} {row.survived:8} "
                  f"{row.equivalent:5} {row.annotations:5} {row.pending:7} {row.score:5.1f}%")
            if args.survivors:
                for item, result in row.survivors:
                    mutation = item.mutations[0]
                    print(f"  survived: {mutation.operator_name} line {mutation.start_pos[0]}")
                    print("    " + (result.diff or "").replace("\n", "\n    "))
    reported = {module for group in groups if (workdir / f"{group}.sqlite").exists()
                for module, _ in tabulate(group, workdir, [])}
    for e in equivalents:
        if e.used or e.module not in reported:
            continue
        print(f"note: equivalent.toml entry matched nothing: {e.module}: {e.original!r} -> {e.mutated!r}")


if __name__ == "__main__":
    main()
