"""The command line: a table of subcommands, each a thin call into the modules.

Exit status: 0 on success, 2 on a user error (one line on stderr, no traceback), 130 when
interrupted (rerun the same command to resume from the cache).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kaggle_tta.config.errors import KaggleTTAError

if TYPE_CHECKING:
    from kaggle_tta.engine.plan import Plan


def _load(args: argparse.Namespace):
    from kaggle_tta.config import load_pipeline

    return load_pipeline(args.pipeline, args.set, override_files=args.overrides)


def _print_stats(stats) -> None:
    if stats.rank is not None and not stats.ranks:  # a rank other than 0: one line, written at once (no interleaving)
        lo, hi = stats.rows
        print(
            f"kaggle-tta: {stats.rank} on {stats.device}: rows {lo}-{hi} of {stats.images}, {stats.rows_computed} "
            f"computed in {stats.seconds:.1f}s; "
            f"{'rank 0 blends' if stats.rank.startswith('rank') else 'join the shares with kaggle-tta cache merge'}",
            flush=True,
        )
        return
    if stats.ranks:
        print(stats.ranks_line)
    if stats.all_cached:
        n = sum(len(m.views_cached) for m in stats.members.values())
        print(f"cache: all {n} (member, view) predictions reused — no model was run")
        for m in stats.members.values():  # precision auto: the members whose entries are fp32 instead, and why
            if m.precision_note and m.precision == "fp32":
                print(f"cache: {m.name}: precision {m.precision_note}")
        return
    for m in stats.members.values():
        parts = []
        if m.views_computed:
            layout = "" if m.channels_last is None else f", {'channels_last' if m.channels_last else 'contiguous'}"
            parts.append(f"{len(m.views_computed)} view(s) computed (forward batch {m.forward_batch}{layout})")
        if m.forwards.saved:  # adaptive views: the rows its gate sent on
            parts.append(f"adaptive: {m.forwards.text()}")
        if m.views_cached:
            parts.append(f"{len(m.views_cached)} reused from the cache")
        if m.nonfinite_recomputed:
            parts.append(f"{m.nonfinite_recomputed} non-finite chunk(s) recomputed in fp32")
        if m.precision_note and (m.views_computed or m.precision == "fp32"):
            parts.append(f"precision {m.precision_note}")
        if m.compile_note and m.views_computed and (m.compiled or "would not repay" not in m.compile_note):
            parts.append(m.compile_note)  # compiled, or a compile that failed; auto's "not worth it" is a phase line
        print(f"cache: {m.name}: {', '.join(parts)}")
    saved = f", {stats.forwards.text()}" if stats.forwards.saved else ""
    print(
        f"inference: {stats.rows_computed} images on {stats.device} ({stats.precision_text}, forward batch "
        f"{stats.forward_batch}) in {stats.seconds:.1f}s{saved}"
    )


def _print_blend(result) -> None:
    print(result.report())
    print(f"wrote {result.path} ({result.n_rows} rows) from '{result.source}'")


def cmd_run(args: argparse.Namespace) -> None:
    from kaggle_tta.api import run
    from kaggle_tta.engine.phases import begin_command

    phases = begin_command(verbose=not args.quiet)
    result = run(_load(args), progress=not args.quiet, fill_hint=args.pipeline)
    _print_stats(result.stats)
    if result.blend is not None:
        _print_blend(result.blend)
    phases.report()


def cmd_infer(args: argparse.Namespace) -> None:
    from kaggle_tta.api import infer
    from kaggle_tta.engine.phases import begin_command

    share = None
    if args.share:
        k, _, n = args.share.partition("/")
        if not (k.isdigit() and n.isdigit() and 0 <= int(k) < int(n)):
            from kaggle_tta.config.errors import ConfigError

            raise ConfigError(
                f"--share {args.share}: give K/N with 0 <= K < N, e.g. --share 1/2 for the second of two machines"
            )
        share = (int(k), int(n))
    phases = begin_command(verbose=not args.quiet)
    _print_stats(infer(_load(args), progress=not args.quiet, share=share))
    phases.report()


def cmd_blend(args: argparse.Namespace) -> None:
    from kaggle_tta.api import blend

    _print_blend(blend(_load(args), fill_hint=args.pipeline))


def cmd_tune(args: argparse.Namespace) -> None:
    from kaggle_tta.tuning.cache import fill_command
    from kaggle_tta.tuning.options import options_from
    from kaggle_tta.tuning.run import tune

    hint = fill_command(args.pipeline, args.overrides, args.set)
    result = tune(_load(args), options=options_from(args), out=args.out, picture=args.picture, fill_hint=hint)
    text = result.report()
    if args.report:
        from kaggle_tta.tuning.report import write_text

        write_text(Path(args.report), text, "--report")
    print(text, end="")


def _current(plan) -> set[tuple[str, str]]:
    """(member, fingerprint) of every entry the pipeline can use, in any precision."""
    return {(m.name, m.fingerprint(p)) for m in plan.members for p in ("fp32", "bf16", "fp16")}


def cmd_cache_ls(args: argparse.Namespace) -> None:
    from kaggle_tta.cache import list_entries, view_states
    from kaggle_tta.engine.plan import build_plan

    plan = build_plan(_load(args))
    current = _current(plan)
    wanted = {m.name: [v.name for v in m.views] for m in plan.members}
    entries = list_entries(plan.cache_root)
    if not entries:
        print(f"{plan.cache_root}: empty")
        return
    print("| member | fingerprint | state | views complete | rows | seconds | MB |")
    print("|---|---|---|---|---|---|---|")
    for member, fp, man in entries:
        views = view_states(man)
        done = [v for v, st in views.items() if st.get("status") == "complete"]
        rows = max((st.get("rows_done", 0) for st in views.values()), default=0)
        secs = sum(st.get("seconds", 0.0) for st in views.values())
        size = sum(f.stat().st_size for f in (plan.cache_root / member / fp).iterdir() if f.is_file()) / 1e6
        state = "current" if (member, fp) in current else "stale"
        damage = _damage(plan, member, fp, man, views)
        state += f" (damaged: {damage}; 'cache verify' names it, a run computes it again)" if damage else ""
        need = wanted.get(member, [])
        have = f"{len([v for v in need if v in done])}/{len(need)}" if (member, fp) in current else f"{len(done)}"
        print(f"| {member} | {fp} | {state} | {have} | {rows} | {secs:.1f} | {size:.1f} |")


def _damage(plan: Plan, member: str, fp: str, manifest: dict, views: dict) -> str:
    """What ``cache ls`` can tell of an entry's damage without reading its views: a manifest
    that does not parse, views a read marked damaged, an ids.json that is not the test set's."""
    from kaggle_tta.cache.entry import CacheEntry
    from kaggle_tta.cache.trust import ids_problem

    if manifest.get("damaged"):
        return "manifest.json"
    said = [v for v, st in views.items() if st.get("status") == "damaged"]
    if views and (member, fp) in _current(plan):  # the row order of this pipeline's test set
        entry = CacheEntry(plan.cache_root, member, fp, blank=True)
        entry.manifest = manifest
        if ids_problem(entry, plan.testset.ids):
            said.append("ids.json")
    return ", ".join(said)


def cmd_cache_prune(args: argparse.Namespace) -> None:
    """Removes this pipeline's members' entries under other fingerprints. Entries of other
    members are never touched, and one that another existing pipeline file recorded using
    (a member of the same name) is kept unless --force."""
    from kaggle_tta.cache import list_entries, remove_entry
    from kaggle_tta.engine.plan import build_plan

    plan = build_plan(_load(args))
    current, mine = _current(plan), {m.name for m in plan.members}
    me = str(plan.cfg.source) if plan.cfg.source else None
    verb = "would remove" if args.dry_run else "removed"
    removed = kept = others = busy = 0
    for member, fp, man in list_entries(plan.cache_root):
        if member not in mine:
            others += 1
            continue
        if (member, fp) in current:
            continue
        users = [p for p in man.get("used_by", {}) if p != me and Path(p).is_file()]
        if users and not args.force:
            print(f"kept {member}/{fp}: used by {', '.join(users)} (--force removes it)")
            kept += 1
            continue
        if not args.dry_run and not remove_entry(plan.cache_root, member, fp):
            print(f"skipped {member}/{fp}: a run is writing it (prune again once it has finished)")
            busy += 1
            continue
        print(f"{verb} {member}/{fp}")
        removed += 1
    note = f"; {others} entr{'y' if others == 1 else 'ies'} of other members left alone" if others else ""
    note += f"; {busy} being written skipped" if busy else ""
    print(f"{verb} {removed} stale entr{'y' if removed == 1 else 'ies'} from {plan.cache_root}, kept {kept}{note}")


def cmd_cache_verify(args: argparse.Namespace) -> None:
    """Reads every cached view of the pipeline whole (checksum, shape, finite values)."""
    from kaggle_tta.cache import CacheEntry
    from kaggle_tta.cache.entry import DamagedEntry
    from kaggle_tta.cache.trust import ids_problem
    from kaggle_tta.config.errors import CacheError
    from kaggle_tta.engine.plan import build_plan

    plan = build_plan(_load(args))
    bad, checked = [], 0
    print("| member | fingerprint | view | state |")
    print("|---|---|---|---|")
    for m in plan.members:
        for p in ("fp32", "bf16", "fp16"):
            if not (plan.cache_root / m.name / m.fingerprint(p)).is_dir():
                continue
            try:
                entry = CacheEntry(plan.cache_root, m.name, m.fingerprint(p), m.inputs)
                trust = {"ids.json": ids_problem(entry, plan.testset.ids)}
            except DamagedEntry as exc:  # nothing of it can be read: the next run computes it again
                entry, trust = None, {"manifest.json": str(exc).split(";")[0]}
            found = {n: why.split(": ", 1)[-1].removeprefix("damaged ") if why else None for n, why in trust.items()}
            if entry is not None:
                found.update(entry.verify_all([v.name for v in m.views], plan.task.stores_image_sizes))
            for view, why in found.items():
                checked += 1
                print(f"| {m.name} | {m.fingerprint(p)} | {view} | {'ok' if why is None else 'damaged: ' + why} |")
                if why is not None:
                    bad.append(f"{m.name}/{m.fingerprint(p)}/{view} ({why})")
    if bad:
        raise CacheError(
            f"{len(bad)} damaged: {'; '.join(bad)}; marked for recomputing — run 'kaggle-tta infer {args.pipeline}'"
        )
    print(f"cache: {checked} view(s) verified, none damaged")


def cmd_cache_merge(args: argparse.Namespace) -> None:
    """Joins shards computed elsewhere (machines without a shared filesystem, each running
    its share into its own cache.dir) into this cache, and assembles what they complete."""
    from kaggle_tta.config.errors import CacheError
    from kaggle_tta.engine.assembly import assemble_from, missing_rows
    from kaggle_tta.engine.plan import build_plan

    plan = build_plan(_load(args))
    for src in args.sources:
        if not Path(src).is_dir():
            raise CacheError(f"{src}: not a folder; give the cache.dir of the machine whose shards to merge")
    done = assemble_from(plan, None, [Path(src) for src in args.sources], lock=True)
    n = len(plan.testset)
    lacking = [
        f"{m.name}/{v.name} ({missing_rows(entry, v.name, n)} rows)"
        for m, entry in done.entries
        for v in m.views
        if not entry.is_complete(v.name)
    ]
    print(f"cache: {done.copied} shard(s) copied, {done.made} view(s) assembled in {plan.cache_root}")
    if lacking:
        raise CacheError(
            f"still missing after the merge: {'; '.join(lacking[:5])}{' ...' if len(lacking) > 5 else ''}; merge "
            f"the other machines' caches too, or run 'kaggle-tta infer {args.pipeline}' to compute them here"
        )


def cmd_demo_data(args: argparse.Namespace) -> None:
    from kaggle_tta.demo.generate import write_split

    n = write_split(Path(args.out), args.n, args.seed, args.size)
    print(f"{args.out}: {n} demo images and labels.csv")


# name -> (function, help, whether it shows a progress bar: only those take --quiet)
COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], None], str, bool]] = {
    "run": (cmd_run, "fill the cache as needed, blend, write the submission", True),
    "infer": (cmd_infer, "fill the cache only", True),
    "blend": (cmd_blend, "blend from the cache and write the submission (builds no model, reads no image)", False),
    "tune": (
        cmd_tune,
        "learn views, weights, temperatures and thresholds from a labelled pipeline's cache; write tuned.yaml "
        "(no model, no image)",
        False,
    ),
    "cache ls": (cmd_cache_ls, "list cache entries: current or stale, views, rows, seconds", False),
    "cache prune": (cmd_cache_prune, "delete this pipeline's members' stale entries (--dry-run lists them)", False),
    "cache merge": (
        cmd_cache_merge,
        "join shards computed on machines without a shared filesystem (their cache.dir) into this cache",
        False,
    ),
    "cache verify": (
        cmd_cache_verify,
        "read every cached view whole: checksum, shape, finite values; mark damage",
        False,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    from kaggle_tta import __version__

    ap = argparse.ArgumentParser(
        prog="kaggle-tta", description="Test-time-augmentation ensemble inference with a prediction cache."
    )
    ap.add_argument("--version", action="version", version=f"kaggle-tta {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (fn, help_text, bar) in COMMANDS.items():
        p = _add_command_parser(sub, groups, name, help_text)
        _add_pipeline_arguments(p, bar)
        _add_command_arguments(p, name)
        p.set_defaults(func=fn)
    _add_demo_data_parser(sub)
    _add_kernel_parser(sub)
    return ap


def _add_command_parser(
    sub: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction], name: str, help_text: str
) -> argparse.ArgumentParser:
    """The parser of a pipeline command; a two-word name ('cache merge') goes under its group's
    subcommands, made on first use."""
    parent, _, child = name.partition(" ")
    if child:
        if parent not in groups:
            gp = sub.add_parser(parent, help=f"{parent} subcommands")
            groups[parent] = gp.add_subparsers(dest="subcommand", required=True)
        return groups[parent].add_parser(child, help=help_text)
    return sub.add_parser(name, help=help_text)


def _add_pipeline_arguments(p: argparse.ArgumentParser, bar: bool) -> None:
    """What every pipeline command takes: the pipeline, its overrides, and (with a progress bar) --quiet."""
    p.add_argument("pipeline", help="path of pipeline.yaml")
    p.add_argument(
        "--overrides",
        action="append",
        default=[],
        metavar="FILE",
        help="a partial pipeline YAML merged over it before --set (repeatable; members and blends by name), e.g. "
        "tune's tuned.yaml",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a YAML value (repeatable), e.g. runtime.precision=fp32",
    )
    if bar:
        p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def _add_command_arguments(p: argparse.ArgumentParser, name: str) -> None:
    """The arguments only one pipeline command takes."""
    if name == "infer":
        p.add_argument(
            "--share",
            metavar="K/N",
            help="compute only the K-th of N shares (0-based) into shard entries: for machines without a shared "
            "filesystem; join them with 'cache merge'",
        )
    if name == "cache merge":
        p.add_argument("sources", nargs="+", metavar="OTHER_CACHE_DIR", help="another machine's cache.dir, copied here")
    if name == "tune":
        from kaggle_tta.tuning import options as tune_options  # light: argument definitions only

        tune_options.add_arguments(p)
    if name == "cache prune":
        p.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
        p.add_argument("--force", action="store_true", help="also remove entries another pipeline file recorded using")


def _add_demo_data_parser(sub: argparse._SubParsersAction) -> None:
    from kaggle_tta.demo import DEMO_SIZE

    d = sub.add_parser(
        "demo-data",
        help="write the embedded demo test set: images, labels.csv, boxes.csv, and masks in OUT_masks/",
        description="Writes synthetic top-down scenes (circle, square, triangle, cross among distractors) as PNGs, "
        "with their class labels (labels.csv), boxes (boxes.csv) and masks (a sibling folder OUT_masks/). "
        "Idempotent.",
    )
    d.add_argument("out", help="folder to write the images into (created if missing)")
    d.add_argument("--n", type=int, default=240, help="number of images (default: 240)")
    d.add_argument("--seed", type=int, default=1, help="random seed; the same seed writes the same set (default: 1)")
    d.add_argument(
        "--size",
        type=int,
        default=DEMO_SIZE,
        help=f"side of each square image in pixels (default: {DEMO_SIZE}, what the demo members were tuned on)",
    )
    d.set_defaults(func=cmd_demo_data)


def _add_kernel_parser(sub: argparse._SubParsersAction) -> None:
    from kaggle_tta import kernel  # light: argument definitions only

    k = sub.add_parser(
        "kernel",
        help="build the offline Kaggle bundle: two datasets (the wheels; the weights and pipeline) and a notebook "
        "kernel",
    )
    kernel.add_arguments(k)
    k.set_defaults(func=kernel.run)


RANKED = ("run", "infer")  # under torchrun every rank takes part in these; rank 0 alone runs the others


def main(argv: Sequence[str] | None = None) -> int:
    from kaggle_tta.api import launched

    args = build_parser().parse_args(argv)
    ranks = launched()
    if ranks is not None and not ranks.main and args.command not in RANKED:
        return 0  # blend, cache, kernel: rank 0's
    from kaggle_tta.engine import phases

    try:
        args.func(args)
    except KaggleTTAError as exc:
        print(f"kaggle-tta: {f'{ranks}: ' if ranks else ''}error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kaggle-tta: interrupted; completed batches are in the cache — rerun to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # the launcher's store failing somewhere not caught closer: one line too
        if ranks is None:
            raise
        from kaggle_tta.dist.group import lost
        from kaggle_tta.dist.ranks import store_error

        if not store_error(exc, sockets=False):
            raise
        print(f"kaggle-tta: {ranks}: error: {lost(exc)}", file=sys.stderr)
        return 2
    finally:
        phases.end()  # a command's recorder is its own: the next call in this process starts afresh
    return 0


if __name__ == "__main__":
    sys.exit(main())
