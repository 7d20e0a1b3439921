"""/metrics: a prometheus_client Collector that reads the status view at scrape time.

Each scrape turns the current snapshot, the run's task-time histogram (counted
only while a page is served: board.DurationHistogram) and the (cached) ledger
reads into metric families.

    crawlproc_tasks_done_total, _failed_total, _retried_total   this run (`crawlproc serve`:
                                                                the last run's row; retried: the ledger's)
    crawlproc_tasks{state}, crawlproc_tasks_pending, _running   the ledger's counts (running: live)
    crawlproc_task_duration_seconds                             histogram of this run's done tasks' times
                                                                (`crawlproc serve`: the ledger's done tasks)
    crawlproc_watcher_lag_seconds, crawlproc_watch_queue_depth  watch: the oldest file event not yet a task
    crawlproc_oldest_pending_age_seconds                        since the oldest pending file's mtime
    crawlproc_files_per_second, crawlproc_workers, crawlproc_run_going
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from crawlproc.serve.view import STATES, StatusView


class RunCollector:
    """prometheus_client's custom-collector protocol: `collect()` yields metric families."""

    def __init__(self, view: StatusView) -> None:
        self.view = view

    def collect(self) -> Iterator[Metric]:
        document = self.view.document()
        live = document.get("live") or {}
        counts = document["counts"]
        yield from _run_counters(document, live)
        by_state = GaugeMetricFamily("crawlproc_tasks", "Tasks in the ledger by state.", labels=["state"])
        for state in STATES:
            by_state.add_metric([state], counts[state])
        yield by_state
        yield GaugeMetricFamily("crawlproc_tasks_pending", "Tasks waiting to be processed.", value=counts["pending"])
        running = live.get("running", counts["running"])
        yield GaugeMetricFamily("crawlproc_tasks_running", "Tasks claimed and being processed (the run's own "
                                "count, fresher than the ledger's).", value=running)
        yield _duration_histogram(document["task_durations"])
        yield from _optional_gauges(live)
        yield GaugeMetricFamily("crawlproc_run_going", "1 while a crawlproc run holds OUT.",
                                value=1 if document.get("running_pid") else 0)


def _run_counters(document: dict[str, Any], live: dict[str, Any]) -> Iterator[Metric]:
    run = document.get("last_run") or {}
    done = live.get("done", run.get("done", 0))
    failed = live.get("failed", run.get("failed", 0))
    retried = live.get("retried", document.get("retried_attempts", 0))
    yield CounterMetricFamily("crawlproc_tasks_done", "Tasks done by this run.", value=done)
    yield CounterMetricFamily("crawlproc_tasks_failed", "Tasks failed for good by this run.", value=failed)
    yield CounterMetricFamily("crawlproc_tasks_retried", "Failed attempts tried again.", value=retried or 0)


def _duration_histogram(durations: dict[str, Any]) -> Metric:
    buckets = [(_bound_text(bound), count) for bound, count in zip(durations["bounds"], durations["cumulative"])]
    buckets.append(("+Inf", durations["count"]))
    return HistogramMetricFamily("crawlproc_task_duration_seconds",
                                 "Time the done tasks took in their worker "
                                 "(this run's; crawlproc serve: the ledger's).",
                                 buckets=buckets, sum_value=durations["sum"])


def _optional_gauges(live: dict[str, Any]) -> Iterator[Metric]:
    """Gauges with a value only when it is known (no sample beats a made-up zero)."""
    watch = live.get("watch")
    if watch is not None:
        yield GaugeMetricFamily("crawlproc_watcher_lag_seconds",
                                "Age of the oldest file event the watcher has not made a task yet.",
                                value=watch.get("lag_s") or 0.0)
        yield GaugeMetricFamily("crawlproc_watch_queue_depth", "Files the watcher holds until they settle.",
                                value=watch.get("queue_depth") or 0)
    if live.get("oldest_pending_age_s") is not None:
        yield GaugeMetricFamily("crawlproc_oldest_pending_age_seconds",
                                "Seconds since the mtime of the oldest pending file.",
                                value=live["oldest_pending_age_s"])
    if live.get("files_per_s") is not None:
        yield GaugeMetricFamily("crawlproc_files_per_second", "Tasks processed per second, lately.",
                                value=live["files_per_s"])
    executor = live.get("executor")
    if executor is not None:
        yield GaugeMetricFamily("crawlproc_workers", "Worker processes (local) or Dask workers.",
                                value=executor.get("workers", 0))


def _bound_text(bound: float) -> str:
    return repr(float(bound))
