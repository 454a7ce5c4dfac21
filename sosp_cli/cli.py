"""``sosp-run``: the Hydra application (the only module that imports Hydra).

Composes ``configs/`` against the typed schema :class:`sosp_cli.config.RunConfig`, converts the
result to dataclasses and calls :func:`sosp_cli.pipeline.run` in the job's output directory.
Under ``torchrun`` (several processes, :mod:`sosp_cli.distributed`) every rank works in rank 0's
output directory and rank 0 alone prints the summary and writes the sweep report.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import signal
import sys
import threading
from datetime import datetime
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.experimental.callback import Callback
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from . import distributed
from .config import RunConfig
from .errors import OtherConfig, SospError, check_choice, describe, message
from .selection import TARGET_NOUNS
from .utils import make_folder, retain_freed_memory, save_text

# the run's messages (epoch lines, summary, ...) go through ``logging``: Hydra's job logging
# (configs/config.yaml, hydra.job_logging) prints them and keeps them in the run folder's run.log;
# named, since under ``python -m sosp_cli.cli`` this module's __name__ is __main__
log = logging.getLogger("sosp_cli.cli")
# why a job stopped, for its run.log: the console gets the line itself (stderr) or Hydra's
# traceback (configs/config.yaml sends this logger to the file only)
stop_log = logging.getLogger("sosp_cli.stop")

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
ConfigStore.instance().store(name="run_schema", node=RunConfig)


def run_stamp(pattern: str, environ=os.environ) -> str:
    """``${run_stamp:PATTERN}``, the leading part of the output directories' names in
    configs/config.yaml: the time now in ``PATTERN`` (``strftime``) — except under torchrun with
    several processes, where the ranks' clocks would name different directories, so the
    torchrun run id (``TORCHELASTIC_RUN_ID``, the same on every rank and node) names it:
    ``torchrun-<run id>``. A ``hydra.run.dir`` / ``hydra.sweep.dir`` on the command line wins."""
    if int(environ.get("WORLD_SIZE", "1")) > 1 and "TORCHELASTIC_RUN_ID" in environ:
        return f"torchrun-{environ['TORCHELASTIC_RUN_ID']}"
    return datetime.now().strftime(pattern)


def run_label(task: str, prune_ratio, seed) -> str:
    """``${run_label:${task},${prune.ratio},${seed}}``, the end of the output directories' names:
    ``r<ratio>_s<seed>`` for a pruning run; ``bottleneck`` for the expand-prune task, whose
    ratios and seeds are ``bottleneck.ratios`` / ``bottleneck.seeds``, not these two."""
    return "bottleneck" if task == "bottleneck" else f"r{prune_ratio}_s{seed}"


# cached, as Hydra's ``now``: every use of one pattern in a process gets the same stamp
OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True, replace=True)
OmegaConf.register_new_resolver("run_label", run_label, replace=True)


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Typed config with launch-relative paths made absolute (jobs run in their own dirs)."""
    run_cfg: RunConfig = OmegaConf.to_object(cfg)
    run_cfg.dataset.root = to_absolute_path(run_cfg.dataset.root)
    run_cfg.pretrain.cache_dir = to_absolute_path(run_cfg.pretrain.cache_dir)
    if run_cfg.pretrain.checkpoint:
        run_cfg.pretrain.checkpoint = to_absolute_path(run_cfg.pretrain.checkpoint)
    if isinstance(run_cfg.model.width, list):
        run_cfg.model.width = [float(w) for w in run_cfg.model.width]
    return run_cfg


def summary(result: dict, out: str | Path | None = None) -> str:
    """The lines printed at the end of a run (``out``: its folder, named last)."""
    rows = [("top-1 before pruning", f"{result['top1_before']:.2f} %"),
            ("top-1 after pruning", f"{result['top1_pruned']:.2f} %"),
            ("top-1 after fine-tuning", f"{result['top1_finetuned']:.2f} %"),
            ("structures removed", f"{result['removed_structures']} ({100 * result['achieved_structures_ratio']:.1f} %)"),
            ("params", f"{result['params_before']:,} → {result['params_after']:,} "
                       f"(−{100 * result['params_reduction']:.1f} %)"),
            ("MACs", f"{result['macs_before']:,} → {result['macs_after']:,} "
                     f"(−{100 * result['macs_reduction']:.1f} %)"),
            ("CPU latency bs64", f"×{result['latency']['cpu_bs64']['speedup']:.2f} speed-up"),
            ("saliency time", f"{result['saliency_seconds']:.2f} s")]
    if result.get("budget_met") is False:   # the layer guards stopped the selection short
        noun = TARGET_NOUNS[result.get("target", "structures")]
        rows.insert(3, ("budget", f"NOT MET: {100 * result['achieved_ratio']:.1f} % of the {noun} removed, "
                                  f"{100 * result['prune_ratio']:.1f} % asked (layer guards; see run.log)"))
    if out is not None:
        rows.append(("run folder", str(out)))
    width = max(len(k) for k, _ in rows)
    target = "" if result.get("target", "structures") == "structures" else f" of {result['target']}"
    head = f"{result['dataset']} / {result['model']} / {result['method']} / ratio {result['prune_ratio']}{target}"
    return "\n".join([head] + [f"  {k:<{width}}  {v}" for k, v in rows])


class ReportCallback(Callback):
    """At the end of a multirun, collect every result.json of the sweep into a report."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from .report import failed_points, write_report
        if not distributed.is_main():
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_absolute():
            sweep_dir = Path(to_absolute_path(str(sweep_dir)))
        try:
            print(write_report(sweep_dir))
        except SospError as exc:
            print(f"sosp-report: {exc}", file=sys.stderr)
        failed = failed_points(sweep_dir)   # the points that wrote FAILED_FILE (hydra_main)
        if failed:
            done = len(list(sweep_dir.rglob("result.json")))
            print(f"sosp-run: error: {len(failed)} of {len(failed) + done} sweep points failed "
                  f"(the others are in the report):\n" + "\n".join(f"  {f}" for f in failed), file=sys.stderr)
            sys.exit(2)


def one_line(exc: BaseException) -> str:
    """Hydra's multi-line composition errors condensed to one line that names the bad value."""
    parts, seen = [], exc
    while seen is not None:
        parts.append(str(seen))
        seen = seen.__cause__ or seen.__context__
    text = "\n".join(parts)
    missing = re.search(r"Could not find '(\w+)/([^']+)'", text)
    if missing:
        group, value = missing.groups()
        options = sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))
        return f"unknown {group} '{value}'; accepted: {', '.join(options)}"
    skip = ("full_key:", "reference_type", "object_type", "To append", "Set the environment")
    lines = []
    for ln in (ln.strip() for ln in text.splitlines()):
        if ln and not ln.startswith(skip) and "$VALUE" not in ln and ln not in lines:
            lines.append(ln)
    return " ".join(lines[:2]) or type(exc).__name__


def sweep_variants(overrides: list[str]) -> list[list[str]] | None:
    """The command lines that put every value of a multirun sweep to the test once: each sweep
    override at each of its values, the others at their first (k compositions for k values in
    all, not their product). None if a sweep cannot be expanded here (``glob(...)`` needs
    Hydra's config loader): Hydra then reports it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides=overrides)
    values = []
    try:
        for o in parsed:
            values.append(list(o.sweep_string_iterator()) if o.is_sweep_override() else [None])
    except Exception:  # noqa: BLE001 - any sweep this cannot expand is left to Hydra
        return None
    first = [o.input_line if v[0] is None else f"{o.get_key_element()}={v[0]}" for o, v in zip(parsed, values)]
    variants = [first]
    for i, (o, vs) in enumerate(zip(parsed, values)):
        variants += [first[:i] + [f"{o.get_key_element()}={v}"] + first[i + 1:] for v in vs[1:]]
    return variants


TASKS = ("prune", "bottleneck")


def task_module(task: str):
    """The module whose ``run`` and ``validate`` carry out ``task``."""
    from . import bottleneck, pipeline
    check_choice("task", task, TASKS)
    return bottleneck if task == "bottleneck" else pipeline


def check_point(cfg: RunConfig, here: bool = True) -> None:
    """What a sweep point would refuse before it trains — every option (:func:`pipeline.validate`,
    :func:`bottleneck.validate`) and a dataset that is not where ``dataset.root`` says — checked
    for each sweep value before the first point runs, not hours into the sweep. ``here=False``
    (the points run on other machines: SLURM) leaves out what only their machine can answer:
    its CUDA devices and its files."""
    from .data import check_dataset_present

    task_module(cfg.task).validate(cfg, here)
    if here:
        check_dataset_present(cfg.dataset.name, cfg.dataset.root, cfg.dataset.download)


def precheck(overrides: list[str]) -> None:
    """Compose the command line once before Hydra runs it — a multirun once per sweep value
    (:func:`sweep_variants`) — so that a bad group choice, unknown key or wrong type is reported
    in one line, before any job of a sweep has run; a multirun's values are also checked as
    its points would check them (:func:`check_point`), and so are a single run's, so that a run
    refused for its options or for what this machine lacks leaves no folder behind."""
    from hydra import compose, initialize_config_dir

    # every override read as Hydra reads it (which reports one it cannot read in several lines)
    # — unless Hydra's own flags are given, whose arguments are not overrides
    only_overrides = all(a in ("-m", "--multirun") or not a.startswith("-") for a in overrides)
    for arg in overrides:
        key = arg.lstrip("+").partition("=")[0]
        folder = key in ("hydra.run.dir", "hydra.sweep.dir")
        if arg.startswith("-") or not (folder or only_overrides):
            continue
        value = _parsed(arg).value()
        # Hydra creates these folders itself, and reports a failure as a traceback
        if folder and isinstance(value, str) and value and "${" not in value:
            make_folder(value, f"{key}={value}")
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in overrides):
        return   # --help, --cfg, ...: Hydra's own
    multirun = any(a in ("-m", "--multirun") for a in overrides)
    plain = [a for a in overrides if not a.startswith("-") and not a.lstrip("+~").startswith("hydra")]
    own = [a for a in overrides if not a.startswith("-") and a.lstrip("+~").startswith("hydra")]
    try:
        expanded = sweep_variants(plain)   # each sweep value once (a preset may sweep without -m)
        if expanded is None:
            return   # a sweep only Hydra's config loader expands (glob): Hydra reports it
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            head = _with_hydra(expanded[0], own)
            # a preset may make the command a multirun (hydra.mode) and sweep itself (its
            # sweeper's params): its points are checked as those of a sweep given with -m
            multirun = multirun or (head is not None and head.hydra.mode == RunMode.MULTIRUN)
            params = dict(head.hydra.sweeper.get("params") or {}) if head is not None else {}
            if not multirun:
                variants = [plain]
            else:
                variants = sweep_variants(swept_overrides(params, plain)) if params else expanded
            # the points run on this machine, unless a launcher other than Hydra's basic one or
            # submitit_local (local processes) sends them elsewhere (SLURM)
            if head is not None:
                here = str(head.hydra.launcher.get("_target_")).endswith(LOCAL_LAUNCHERS)
            else:
                here = all(a.lstrip("+").partition("=")[2] in ("basic", "submitit_local")
                           for a in own if a.lstrip("+").startswith("hydra/launcher="))
            for variant in variants or ():
                # a single run too: refused here, Hydra makes no run folder for it
                check_point(to_run_config(compose("config", overrides=variant)), here or not multirun)
    except SospError:
        raise
    except Exception as exc:  # noqa: BLE001 - every composition error is the user's input
        raise SospError(one_line(exc)) from None


# Hydra's launchers that run a sweep's points as processes of this machine
LOCAL_LAUNCHERS = ("basic_launcher.BasicLauncher", "submitit_launcher.LocalLauncher")


def _with_hydra(overrides: list[str], own: list[str]):
    """The config of ``overrides`` with Hydra's own node (its mode, sweeper, launcher), as the
    command's ``hydra...`` overrides ``own`` set it; None if it cannot be composed (the job's
    config is then composed on its own, and reported in one line; what Hydra refuses of its own
    settings, Hydra reports as it runs)."""
    from hydra import compose
    try:
        return compose("config", overrides=overrides + own, return_hydra_config=True)
    except Exception:  # noqa: BLE001 - Hydra's own settings: Hydra reports them as it runs
        return None


def swept_overrides(params: dict, overrides: list[str]) -> list[str]:
    """The overrides of a multirun whose sweeper's ``params`` (a preset's sweep) sweep as well:
    the command line's value of a key replaces the preset's, in the preset's place — the list
    Hydra's basic sweeper makes its jobs from (``BasicSweeper.split_arguments``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    merged: dict[str, str] = {}
    for arg in [f"{k}={v}" for k, v in params.items()] + list(overrides):
        merged[OverridesParser.create().parse_overrides([arg])[0].get_key_element()] = arg
    return list(merged.values())


def _parsed(arg: str):
    """Hydra's reading of the override ``arg``; one line if it cannot read it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    try:
        return OverridesParser.create().parse_overrides([arg])[0]
    except Exception as exc:  # noqa: BLE001 - Hydra's grammar errors: the user's input
        reason = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise SospError(f"cannot read the override {arg!r} ({reason}); quote a value with spaces or "
                        "other special characters for Hydra, inside the shell's quotes: 'key=\"a value\"'") from None


def hydra_override(key: str, value: str) -> str:
    """``key=value`` as Hydra reads it back to exactly ``value`` (not a sweep, not a parse error):
    as it is where it does, else with the value quoted — e.g. a folder with a space or a comma."""
    plain = f"{key}={value}"
    try:
        read = _parsed(plain)
        if not read.is_sweep_override() and read.value() == value:
            return plain
    except SospError:
        pass
    # in double quotes (the shell's quoting of the override is then single quotes, readable): a
    # backslash escapes the quote, and backslashes before a quote are escaped
    escaped = re.sub(r'(\\*)"', lambda m: m.group(1) * 2 + '\\"', value)
    escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped)
    return f'{key}="{escaped}"'


# the shell's exit status of a process stopped by SIGINT (128 + 2): Ctrl-C stops a sweep too
INTERRUPTED = 130
# ... and by SIGTERM (128 + 15)
TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """SIGTERM — a scheduler's time limit (plain ``sbatch``), ``scancel``, ``kill`` — raised where
    the run is, so that it stops as Ctrl-C stops it (:func:`stop_on_sigterm`)."""


@contextlib.contextmanager
def stop_on_sigterm():
    """While inside: SIGTERM stops ``sosp-run`` as Ctrl-C does — one line naming the override that
    resumes the run, in the console and ``run.log``, what finished kept; a second SIGTERM kills
    at once. The handler before is put back on the way out. Nothing changes under submitit, whose
    own handlers checkpoint and requeue a SLURM job, nor under torchrun, whose agent stops a
    failed group with SIGTERM: a rank waiting in a collective operation would not run a Python
    handler and must die at once."""
    if any(k in os.environ for k in ("SUBMITIT_EXECUTOR", "TORCHELASTIC_RUN_ID", "LOCAL_RANK")) or \
            threading.current_thread() is not threading.main_thread():   # (only it may set handlers)
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated()

    before = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _stopped(exc: KeyboardInterrupt) -> tuple[str, int]:
    """What stopped the process, for its line, and the exit status."""
    if isinstance(exc, Terminated):
        return "stopped by SIGTERM", TERMINATED
    return "interrupted", INTERRUPTED


def resume_override(out: str | Path, sweep: bool) -> str:
    """The override that makes the same command resume this job (shell-quoted): its folder —
    which the default folder name, stamped with the time, would not give — or its sweep's."""
    if sweep:
        folder = hydra_override("hydra.sweep.dir", str(Path(to_absolute_path(str(HydraConfig.get().sweep.dir)))))
    else:
        folder = hydra_override("hydra.run.dir", str(out))
    return shlex.quote(folder)


def save_run_record(out: str | Path, cfg: DictConfig) -> None:
    """Hydra's record of this job — ``config.yaml`` (the composed config), ``hydra.yaml``,
    ``overrides.yaml``, as Hydra writes them (``hydra.core.utils.run_job``) — into the run folder
    ``out``'s ``.hydra`` (the folder ``sosp-report`` reads, :data:`sosp_cli.report.CONFIG_FILE`),
    once the run has accepted the folder (configs/config.yaml sets Hydra's ``output_subdir`` to
    null): a refused run leaves the record of the folder's own run as it was."""
    from .report import CONFIG_FILE
    hydra_cfg = HydraConfig.instance().cfg
    folder = Path(out) / CONFIG_FILE.parent
    make_folder(folder, str(folder))
    for name, node in ((CONFIG_FILE.name, cfg), ("hydra.yaml", hydra_cfg),
                       ("overrides.yaml", hydra_cfg.hydra.overrides.task)):
        save_text(OmegaConf.to_yaml(node), folder / name)


def changed_settings(before: DictConfig, now: DictConfig) -> list[str]:
    """``key before → now`` for every setting (dotted key, :func:`sosp_cli.report.flat_settings`)
    whose value differs between two composed configs; a setting only one has reads "(absent)"
    in the other."""
    from .report import flat_settings
    a, b = (flat_settings(OmegaConf.to_container(c, resolve=False)) for c in (before, now))
    absent = "(absent)"
    return [f"{k} {a.get(k, absent)} → {b.get(k, absent)}" for k in list(a) + [k for k in b if k not in a]
            if a.get(k, absent) != b.get(k, absent)]


def changes_from_record(out: str | Path, cfg: DictConfig, limit: int = 6) -> str:
    """What this run changes from the run that made the folder's artefacts, read from the
    folder's record (:func:`save_run_record`); "" without a readable record or a difference."""
    from .report import CONFIG_FILE
    try:
        before = OmegaConf.load(Path(out) / CONFIG_FILE)
    except Exception:  # noqa: BLE001 - no record (a folder made through the Python API), or not one Hydra wrote
        return ""
    changes = changed_settings(before, cfg)
    if not changes:
        return ""
    more = f", and {len(changes) - limit} more" if len(changes) > limit else ""
    return f"this run changes {', '.join(changes[:limit])}{more} from the folder's {CONFIG_FILE}"


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> dict | None:
    from .report import FAILED_FILE
    from .utils import resolve_device
    run_cfg = to_run_config(cfg)
    out = HydraConfig.get().runtime.output_dir
    sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    logging.captureWarnings(True)   # warnings on stderr as before, and into run.log
    try:
        distributed.init_from_env(resolve_device(run_cfg.device))
        out = distributed.broadcast_object(out)   # the ranks' clocks may name different directories
        if distributed.is_main():   # first: a job killed outright (SIGKILL, a lost node) names it too
            log.info(f"[run] folder {out} (if stopped, the same command with "
                     f"{resume_override(out, sweep)} resumes {'the sweep' if sweep else 'it'})")
            if run_cfg.note:
                log.info(f"[{run_cfg.experiment_name}] {run_cfg.note}")
        result = task_module(run_cfg.task).run(run_cfg, out, accepted=lambda folder: save_run_record(folder, cfg))
    except KeyboardInterrupt as exc:   # Ctrl-C, SIGTERM: one line, not a traceback from wherever it landed
        what, status = _stopped(exc)
        if distributed.is_main():
            line = (f"sosp-run: {what}; what finished is kept (stages, and training up to its last "
                    f"finished epoch); to resume, run the same command with {resume_override(out, sweep)}")
            print(f"\n{line}", file=sys.stderr)
            stop_log.warning(line)
        sys.exit(status)
    except SospError as exc:
        if isinstance(exc, OtherConfig) and not exc.changes:
            exc = OtherConfig(exc.path, exc.found, exc.key, exc.partial, changes_from_record(out, cfg))
        text = message(exc)
        print(f"sosp-run: error: {text}", file=sys.stderr)
        stop_log.error(f"sosp-run: error: {text}")
        if sweep:   # the other sweep points still run
            if distributed.is_main():
                Path(out, FAILED_FILE).write_text(f"{text}\n")
            return None
        sys.exit(2)
    except Exception as exc:   # noqa: BLE001 - a fault (a bug, memory): its traceback, then the next point
        if not sweep or distributed.world_size() > 1:
            stop_log.exception(f"[run] failed ({describe(exc)})")
            raise   # a single run shows it as Hydra does; under torchrun the other ranks must stop too
        log.exception(f"[run] this sweep point failed ({describe(exc)}); the sweep goes on")
        Path(out, FAILED_FILE).write_text(f"{describe(exc)} (its traceback: run.log)\n")
        return None
    if distributed.is_main():
        Path(out, FAILED_FILE).unlink(missing_ok=True)   # an earlier failure of this point, rerun
        if run_cfg.task == "prune":
            log.info(summary(result, out))
    if not sweep or "SUBMITIT_EXECUTOR" in os.environ:
        distributed.finish()   # this process runs no further job (a submitit job runs one point)
    return result


def main() -> None:
    """Console entry point of ``sosp-run``."""
    with stop_on_sigterm():
        _main()


def _main() -> None:
    try:
        retain_freed_memory()
        precheck(sys.argv[1:])
    except SospError as exc:
        print(f"sosp-run: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        what, status = _stopped(exc)
        print(f"\nsosp-run: {what} before the run started", file=sys.stderr)
        sys.exit(status)
    try:
        hydra_main()
    except KeyboardInterrupt as exc:   # outside a job (Hydra's set-up, the sweep's report): nothing to resume
        what, status = _stopped(exc)
        print(f"\nsosp-run: {what}", file=sys.stderr)
        sys.exit(status)
    except ValueError as exc:   # Hydra's own flags misused (``-m --cfg hydra``): Hydra reports what
        # fails inside a job itself, so only its command-line checks reach here
        print(f"sosp-run: error: {exc}", file=sys.stderr)
        sys.exit(2)
    distributed.finish()   # after a multirun's last point in this process (a no-op if left already)


if __name__ == "__main__":
    main()
