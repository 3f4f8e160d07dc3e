"""``run_predict``: a whole predict job (find inputs, open the backend, classify and explain, write
records) as one library call that the CLI, the quick start and the benchmarks share.

Faults are sorted by whose they are (DESIGN.md, Trust). One input's fault is that input's record. A fault of
the run itself (the bundle, the backend, the output) ends it; the records written so far stay. SIGINT and
SIGTERM end it between records, with what was done kept and one line saying so.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr.runtime.bundle import Bundle
from cxr.runtime.errors import CxrError, CxrUsageError, one_line
from cxr.runtime.explain import ExplainConfig
from cxr.runtime.inputs import Discovered, discover, not_images_line
from cxr.runtime.ood import bundle_gate
from cxr.runtime.output import OutputPlan, RecordWriter, plan_output, record_path
from cxr.runtime.predict import OpeningExplainer, PredictOptions, StageTimes, predict_stream
from cxr.runtime.preprocess import DEFAULT_MAX_PIXELS
from cxr.runtime.reading import default_workers

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FATAL, EXIT_SOME_FAILED = 0, 1, 2
SIGNAL_EXITS = {"SIGINT": 130, "SIGTERM": 143}


@dataclass(frozen=True, kw_only=True)
class PredictJob:
    """Everything ``cxr-run predict`` is asked to do."""

    inputs: list[str]
    model: Path
    backend: str = "auto"
    precision: str | None = None
    batch_size: int = 16
    server: str | None = None
    server_model: str = "cxr"
    timeout: float = 30.0
    out: Path | None = None
    resume: bool = False
    overwrite: bool = False
    top_k: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    explain: ExplainConfig | None = None
    explain_dir: Path | None = None
    strict: bool = False
    workers: int | None = None  # threads reading inputs ahead of the backend (None: one per core)
    expect_digest: str | None = None
    trusted_key: Path | None = None
    allow_unvalidated: bool = False


@dataclass(kw_only=True)
class PredictSummary:
    """What a job did: counts, where the records went, and why it stopped early if it did."""

    inputs: int = 0  # inputs this run read (after a resume's skips)
    predicted: int = 0
    warned: int = 0
    failed: int = 0
    resumed: int = 0  # inputs skipped because --out already records them
    not_images: list[Path] = field(default_factory=list)
    out: Path | None = None
    written: int = 0  # records this run wrote
    backend: str = ""  # what runs the images, and what was skipped
    interrupted: str | None = None  # the signal that stopped the run
    stopped_by: str | None = None  # the fault of the run that ended it
    first_result_s: float | None = None
    classifier_open_s: float = 0.0
    explainer_open_s: float | None = None
    run_s: float = 0.0  # from the first input read to the last record written
    stages: StageTimes = field(default_factory=StageTimes)

    @property
    def images_per_s(self) -> float:
        return self.stages.images / self.run_s if self.run_s > 0 else 0.0

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return SIGNAL_EXITS.get(self.interrupted, EXIT_FATAL)
        if self.stopped_by:
            return EXIT_FATAL
        if self.failed:
            return EXIT_SOME_FAILED
        return EXIT_OK

    def line(self) -> str:
        """The closing line: counts, where the records are, how the run ended."""
        kept = f"{record_path(self.out)}" if self.out else "stdout"
        parts = [
            f"{self.predicted} predicted",
            f"{self.warned} of them with warnings (see their 'warnings')" if self.warned else "",
            f"{self.failed} failed (see their 'error')" if self.failed else "",
            f"{self.resumed} already in {kept} (resumed)" if self.resumed else "",
            not_images_line(self.not_images) if self.not_images else "",
            f"wrote {record_path(self.out)}" if self.out and self.written else "",
            _opening_line(self.first_result_s, self.classifier_open_s, self.explainer_open_s),
        ]
        return one_line("; ".join(p for p in parts if p))

    def stop_line(self) -> str | None:
        """One line on an early end: what stopped it and what was kept; None when the run finished."""
        kept = f"{self.written} record(s) kept in {record_path(self.out) if self.out else 'stdout'}"
        again = "; rerun with --resume to finish" if self.out else ""
        if self.interrupted:
            return f"interrupted by {self.interrupted}: {kept}{again}"
        if self.stopped_by:
            return f"{self.stopped_by}; {kept}{again}"
        return None


class RunInterrupted(BaseException):
    """SIGINT or SIGTERM arrived: stop between records. Not an ``Exception``: no step that turns an input's
    faults into its record may catch it (an interrupt is never an input's failure)."""


class SignalStop:
    """SIGINT and SIGTERM end the job between records: the handler raises ``RunInterrupted`` in the main
    thread, except while a record is being written (``deferred``), where it waits for the record's end."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._deferring = False

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signal.Signals(signum).name
        if not self._deferring:
            raise RunInterrupted(self.received)

    @contextmanager
    def installed(self) -> Iterator[SignalStop]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals reach the main thread only; a job run elsewhere is stopped by its caller
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self.received:
            raise RunInterrupted(self.received)


def run_predict(job: PredictJob, on_record: Callable[[dict[str, Any]], None] | None = None) -> PredictSummary:
    """Run a predict job; returns its summary (``exit_code`` says how it went). Problems of the job before any
    work (bad options, bundle, ``--out``) raise ``CxrError``; later faults of the run end it with the records
    kept, in the summary."""
    started = time.perf_counter()
    _check_job(job)
    bundle = Bundle.open(job.model, job.expect_digest, job.trusted_key)
    found = discover(job.inputs)
    if not found.inputs:
        raise CxrError(f"nothing to predict: {_nothing_found(found)}")
    plan = plan_output(job.out, found.inputs, bundle.digest, job.resume, job.overwrite)
    if job.explain is not None:
        _check_explain_dir(_explain_dir(job), job.inputs)
    paths = unrecorded(found.inputs, plan.recorded)
    summary = PredictSummary(
        inputs=len(paths), resumed=len(found.inputs) - len(paths), not_images=found.not_images, out=job.out
    )
    if not paths:
        log.info(f"all {summary.resumed} inputs are already recorded in {record_path(job.out)}")
        return summary
    stop = SignalStop()
    with stop.installed():
        try:
            _run(job, bundle, found, paths, plan, summary, stop, started, on_record)
        except RunInterrupted as exc:
            summary.interrupted = str(exc)
    return summary


def _run(
    job: PredictJob,
    bundle: Bundle,
    found: Discovered,
    paths: list[Path],
    plan: OutputPlan,
    summary: PredictSummary,
    stop: SignalStop,
    started: float,
    on_record: Callable[[dict[str, Any]], None] | None,
) -> None:
    """Open, then stream every input's record to the writer; a fault of the run (CxrError) ends it here."""
    from cxr.runtime.backends.select import check_validated

    explain_dir = _explain_dir(job) if job.explain else None
    if job.server is not None:
        classifier, summary.backend = _open_server(job, bundle)
        explainer = None
    else:
        classifier, summary.backend, explainer = _open_local(job, bundle, len(paths))
    summary.classifier_open_s = time.perf_counter() - started
    shown: set[str] = set()
    with classifier:
        try:
            log.info(f"backend: {summary.backend}")
            local = job.server is None
            caution = check_validated(bundle, classifier, job.allow_unvalidated) if local else None
            if caution:
                log.warning(f"warning: {caution}")
            options = PredictOptions(
                batch_size=job.batch_size,
                top_k=job.top_k,
                max_pixels=job.max_pixels,
                explain=job.explain,
                explain_dir=explain_dir,
                strict=job.strict,
                bundle_digest=bundle.digest,
                protected=_inode_keys(paths) if job.explain else frozenset(),
                gate=bundle_gate(bundle, classifier.precision),
                workers=job.workers if job.workers is not None else default_workers(),
            )
            records = predict_stream(
                paths, bundle, classifier, options, explainer, found.errors, summary.stages
            )
            loop_started = time.perf_counter()
            with RecordWriter(plan, bundle.card.classes) as writer:
                try:
                    for record in records:
                        written_at = time.perf_counter()
                        with stop.deferred():
                            writer.write(record)
                        summary.stages.write_s += time.perf_counter() - written_at
                        summary.written = writer.written
                        _count(record, summary, shown, started)
                        if on_record is not None:
                            on_record(record)
                except BrokenPipeError:
                    _silence_stdout()
                    summary.stopped_by = "stdout was closed"
                except CxrError as exc:
                    summary.stopped_by = str(exc)
                finally:
                    summary.written = writer.written
                    records.close()
                    summary.run_s = time.perf_counter() - loop_started
        finally:
            if explainer is not None:
                explainer.close()
                summary.explainer_open_s = explainer.open_s


def _count(record: dict[str, Any], summary: PredictSummary, shown: set[str], started: float) -> None:
    failed = record["error"] is not None
    summary.failed += failed
    summary.predicted += not failed
    summary.warned += bool(record["warnings"]) and not failed
    _warn_once(record, shown)
    if summary.first_result_s is None:
        summary.first_result_s = time.perf_counter() - started


def _explain_dir(job: PredictJob) -> Path:
    """Where overlays go: ``--explain-dir``, else explanations/ beside ``--out`` (or here)."""
    if job.explain_dir is not None:
        return job.explain_dir
    return (job.out.parent if job.out else Path(".")) / "explanations"


def _check_explain_dir(explain_dir: Path, inputs: list[str]) -> None:
    """Overlays inside a folder being read would be read as films by the next run (and a resume)."""
    target = explain_dir.resolve()
    for item in inputs:
        folder = Path(item)
        if folder.is_dir() and (target == folder.resolve() or folder.resolve() in target.parents):
            raise CxrUsageError(
                f"--explain-dir {record_path(explain_dir)} is inside the input folder {record_path(folder)}: "
                "the next run would read the overlays as films; choose a folder outside it"
            )


def unrecorded(inputs: list[Path], recorded: set[str]) -> list[Path]:
    """The inputs a resume must still run: those ``--out`` does not record. Two inputs whose names read the
    same in a record (undecodable bytes shown as ``\\xNN``) are both run again, never skipped on a guess."""
    names = [record_path(p) for p in inputs]
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return [p for p, name in zip(inputs, names) if name not in recorded or counts[name] > 1]


def _check_job(job: PredictJob) -> None:
    from cxr.runtime.segment import SEGMENTERS

    if job.explain is not None and job.explain.segmenter not in SEGMENTERS:
        names = ", ".join(SEGMENTERS)
        raise CxrUsageError(f"--segmenter must be one of {names}, got {job.explain.segmenter!r}")
    if job.top_k < 0:
        raise CxrUsageError("--top-k must be 0 or more")
    if job.batch_size < 1:
        raise CxrUsageError("--batch-size must be at least 1")
    if job.max_pixels < 1:
        raise CxrUsageError("--max-pixels must be at least 1")
    if job.timeout <= 0:
        raise CxrUsageError("--timeout must be above 0 seconds")
    if job.workers is not None and not 1 <= job.workers <= 64:
        raise CxrUsageError(f"--workers must be from 1 to 64, got {job.workers}")


def _nothing_found(found: Discovered) -> str:
    if found.not_images:
        return f"{not_images_line(found.not_images)} (PNG, JPEG, TIFF, BMP, WebP, GIF or DICOM expected)"
    return "no files"


def _inode_keys(paths: list[Path]) -> frozenset[tuple[int, int]]:
    keys = set()
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            continue
        keys.add((info.st_dev, info.st_ino))
    return frozenset(keys)


def _silence_stdout() -> None:
    """The reader of stdout went away (``| head``): point stdout at /dev/null so exiting does not complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _warn_once(record: dict[str, Any], shown: set[str]) -> None:
    """Each kind of warning once per run (the records carry every one)."""
    for text in record.get("warnings") or []:
        kind = re.sub(r"[\d.]+", "N", text)
        if kind not in shown:
            shown.add(kind)
            log.warning(
                one_line(f"warning: {record['path']}: {text} (shown once; every record lists its warnings)")
            )


def _opening_line(first_result_s: float | None, classifier_s: float, explainer_s: float | None) -> str:
    """How long the first answer took and what opening cost (the explainer's warm-up overlaps the first
    batch)."""
    if first_result_s is None:
        return ""
    explainer = f", explainer {explainer_s:.1f} s beside it" if explainer_s is not None else ""
    return (
        f"first result {first_result_s:.1f} s after start (classifier open {classifier_s:.1f} s{explainer})"
    )


def _open_local(job: PredictJob, bundle: Bundle, images: int) -> tuple[Any, str, OpeningExplainer | None]:
    """The classifier, and with an explanation the explainer opening beside it from the start: its warm-up
    (the cuDNN search on a GPU) is the longest part of the first answer, so it overlaps the classifier's open
    and the first batch. Once the classifier is open the explainer must match its backend and precision.
    ``images``: the job's size (a short one opens the explainer with a quicker search). The classifier is
    made ready for the job's batches as part of its open."""
    from cxr.runtime.backends.select import open_classifier, open_explainer

    precision = job.precision or "fp32"
    explainer = (
        OpeningExplainer(lambda: open_explainer(bundle, job.backend, precision, images)[0])
        if job.explain
        else None
    )
    classifier = None
    try:
        classifier, reason = open_classifier(bundle, job.backend, precision, maps=job.explain)
        ready = classifier.ready_for(min(job.batch_size, images))  # the first batch's compile, paid here
    except BaseException:
        if classifier is not None:
            classifier.close()
        if explainer is not None:
            explainer.close()
        raise
    reason += f"; {ready}" if ready else ""
    if explainer is not None:
        explainer.match(
            classifier.name,
            classifier.precision,
            lambda: open_explainer(bundle, classifier.name, classifier.precision, images)[0],
        )
    return classifier, reason, explainer


def _open_server(job: PredictJob, bundle: Bundle) -> tuple[Any, str]:
    """The remote classifier, after checking the server runs this bundle's model; a down server is not fatal
    (every file then gets the connection error, as a failed file does locally)."""
    from cxr.runtime.backends.triton_client import TritonClientBackend, model_mismatch

    if job.explain:
        raise CxrUsageError("--explain runs on the local backend; drop --server to explain")
    if job.backend != "auto":
        raise CxrUsageError("--backend is chosen by the server; drop it with --server")
    remote = TritonClientBackend(job.server, job.server_model, job.timeout)
    try:
        served = remote.server_card()
    except CxrError as exc:
        return remote, f"not reachable: {exc}"
    mismatch = model_mismatch(bundle.card, served)
    if mismatch:
        raise CxrError(f"server {job.server} serves another model than {bundle.folder} ({mismatch})")
    if job.precision not in (None, "auto", remote.precision):
        raise CxrUsageError(f"--precision {job.precision}: server {job.server} runs {remote.precision}")
    return remote, f"server {job.server}, model {job.server_model}"
