#!/usr/bin/env python3
"""Writes deltaserve-dashboard.json: the Grafana dashboard of every deltaserve_ metric (server/metrics/metrics.cc).

    python3 deploy/grafana/make_dashboard.py     (rewrites deploy/grafana/deltaserve-dashboard.json)

Edit the PANELS below, not the JSON. tests/client/loadgen_integration_test.cc checks that the JSON parses, that every
metric it queries is exported by a real server, and that every exported deltaserve_ metric is on it.
"""
import json
import os

SEL = 'instance=~"$instance"'  # every query is filtered by the instance variable


def q(expr, legend=""):
    return {"expr": expr.replace("SEL", SEL), "legendFormat": legend}


def rate(metric, by="", extra=""):
    sel = SEL + ("," + extra if extra else "")
    inner = f"rate({metric}{{{sel}}}[$__rate_interval])"
    return f"sum by ({by}) ({inner})" if by else f"sum({inner})"


def quantiles(metric, by=""):
    """p50 / p95 / p99 of a histogram, optionally per label."""
    group = f"le{',' + by if by else ''}"
    legend = f"{{{{{by}}}}} " if by else ""
    return [q(f"histogram_quantile({p / 100}, sum by ({group}) (rate({metric}_bucket{{SEL}}[$__rate_interval])))",
              f"{legend}p{p}") for p in (50, 95, 99)]


def mean(metric, by=""):
    grp = f" by ({by})" if by else ""
    return (f"sum{grp}(rate({metric}_sum{{SEL}}[$__rate_interval])) / "
            f"sum{grp}(rate({metric}_count{{SEL}}[$__rate_interval]))")


NOT_OK = 'code!="OK"'
DEVICE = 'tier="device"'


def ratio(a, b):
    return f"{a} / {b}"


# (row title, [(panel title, unit, description, [targets], kind)])
PANELS = [
    ("Traffic", [
        ("Requests / s by RPC", "reqps", "Finished RPCs per second (deltaserve_requests_total).",
         [q(rate("deltaserve_requests_total", "rpc"), "{{rpc}}")], "timeseries"),
        ("Errors / s by code", "reqps", "RPCs that did not end OK, by gRPC status code. RESOURCE_EXHAUSTED: queues "
         "full (backpressure); DEADLINE_EXCEEDED: deadline passed while queued.",
         [q(rate("deltaserve_requests_total", "code", 'code!="OK"'), "{{code}}")], "timeseries"),
        ("Error ratio", "percentunit", "Share of RPCs not OK.",
         [q(ratio(rate("deltaserve_requests_total", "", NOT_OK), rate("deltaserve_requests_total")), "errors")],
         "stat"),
        ("Request latency (p50 / p95 / p99) by RPC", "s", "Time from receiving an RPC to answering it.",
         quantiles("deltaserve_request_duration_seconds", "rpc"), "timeseries"),
        ("Inputs and tokens / s", "short", "Inputs (texts or id lists) and their tokens processed per second.",
         [q(rate("deltaserve_embed_inputs_total"), "inputs/s"), q(rate("deltaserve_embed_tokens_total"), "tokens/s")],
         "timeseries"),
    ]),
    ("Tenants", [
        ("Requests / s by tenant", "reqps", "Per-tenant request counts (the first tenants seen keep their name, "
         "later ones are counted as \"other\"; raw task ids are never labels).",
         [q(rate("deltaserve_tenant_requests_total", "tenant"), "{{tenant}}")], "timeseries"),
        ("Requests / s by priority", "reqps", "Admitted requests by scheduling priority (all tenants).",
         [q(rate("deltaserve_tenant_requests_total", "priority"), "{{priority}}")], "timeseries"),
        ("Queued rows by tenant", "short", "Rows each tenant has waiting in the scheduler now: a tenant whose "
         "queue grows is sending more than its fair share.",
         [q("sum by (tenant) (deltaserve_tenant_queued_rows{SEL})", "{{tenant}}")], "timeseries"),
        ("Rejected requests / s by reason", "reqps", "Requests turned away before queueing (RESOURCE_EXHAUSTED with "
         "a retry hint): queue full, tenant queue full, ...",
         [q(rate("deltaserve_queue_rejected_requests_total", "reason"), "{{reason}}")], "timeseries"),
    ]),
    ("Scheduler and batches", [
        ("Queue time (p50 / p95 / p99)", "s", "Time a row waits in the scheduler's queue before its batch runs.",
         quantiles("deltaserve_queue_duration_seconds"), "timeseries"),
        ("Queued rows", "short", "Rows waiting for a batch now.",
         [q("sum(deltaserve_queue_rows{SEL})", "queued rows")], "timeseries"),
        ("Dropped rows / s by reason", "short", "Queued rows dropped uncomputed because their request ended "
         "(deadline, cancellation).",
         [q(rate("deltaserve_queue_dropped_rows_total", "reason"), "{{reason}}")], "timeseries"),
        ("Batches / s and forward time", "short", "Forward passes per second; mean and p99 time of one pass.",
         [q(rate("deltaserve_batches_total"), "batches/s")] + [
             q(mean("deltaserve_batch_duration_seconds"), "mean forward s"),
             q("histogram_quantile(0.99, sum by (le) (rate(deltaserve_batch_duration_seconds_bucket{SEL}"
               "[$__rate_interval])))", "p99 forward s")], "timeseries"),
        ("Rows per batch", "short", "Rows (input sequences) per forward pass: mean and p50 / p99.",
         [q(mean("deltaserve_batch_rows"), "mean")] + quantiles("deltaserve_batch_rows")[0::2], "timeseries"),
        ("Padded tokens per batch", "short", "Padded tokens (rows x longest row) per forward pass.",
         [q(mean("deltaserve_batch_padded_tokens"), "mean")] + quantiles("deltaserve_batch_padded_tokens")[0::2],
         "timeseries"),
        ("Padding efficiency", "percentunit", "Real tokens / padded tokens computed (1 = no padding).",
         [q(ratio(rate("deltaserve_batch_real_tokens_total"), rate("deltaserve_batch_padded_tokens_total")),
            "real / padded")], "stat"),
        ("Distinct deltas per batch", "short", "How many different delta packs (tasks) share one forward pass.",
         [q(mean("deltaserve_batch_distinct_deltas"), "mean")] + quantiles("deltaserve_batch_distinct_deltas")[0::2],
         "timeseries"),
        ("Rows / s by delta method", "short", "Rows computed per second by the delta method they carry "
         "(\"none\" = the base model).",
         [q(rate("deltaserve_batch_rows_by_method_total", "method"), "{{method}}")], "timeseries"),
    ]),
    ("Delta cache", [
        ("Cache lookups / s by tier", "short", "Pack lookups by the tier that answered: device = a hit; host = "
         "recently evicted bytes still in host memory; store = loaded from the delta store.",
         [q(rate("deltaserve_delta_cache_lookups_total", "tier"), "{{tier}}")], "timeseries"),
        ("Cache hit ratio", "percentunit", "Lookups answered by packs already on the device.",
         [q(ratio(rate("deltaserve_delta_cache_lookups_total", "", DEVICE),
                  rate("deltaserve_delta_cache_lookups_total")), "hit ratio")], "stat"),
        ("Pack loads / s by source and outcome", "short", "Loads into the device tier (one per digest, however many "
         "requests missed at once).",
         [q(rate("deltaserve_delta_loads_total", "source,outcome"), "{{source}} {{outcome}}")], "timeseries"),
        ("Pack load latency (p50 / p95 / p99) by source", "s", "Read, verify, parse and bind one pack.",
         quantiles("deltaserve_delta_load_seconds", "source"), "timeseries"),
        ("Evictions / s by tier", "short", "Packs evicted from a tier (least recently used, unpinned).",
         [q(rate("deltaserve_delta_cache_evictions_total", "tier"), "{{tier}}")], "timeseries"),
        ("Resident bytes by tier", "bytes", "Bytes the cache holds: device (bound packs) and host (evicted bytes).",
         [q("sum by (tier) (deltaserve_delta_cache_resident_bytes{SEL})", "{{tier}}")], "timeseries"),
        ("Resident packs by tier", "short", "Packs the cache holds per tier.",
         [q("sum by (tier) (deltaserve_delta_cache_resident_packs{SEL})", "{{tier}}")], "timeseries"),
        ("Store bytes / s (push, pull)", "Bps", "Pack bytes received and sent by the Deltas API.",
         [q(rate("deltaserve_delta_store_bytes_total", "direction"), "{{direction}}")], "timeseries"),
    ]),
    ("Fine-tuning", [
        ("Jobs queued and running", "short", "Fine-tuning jobs waiting for a worker and training now "
         "(--max_concurrent_jobs run at once).",
         [q("sum by (state) (deltaserve_tuning_jobs{SEL})", "{{state}}")], "timeseries"),
        ("Jobs / min by state", "short", "Jobs entering each state: queued = submitted; succeeded, failed and "
         "cancelled = finished. Failed jobs say why in GetJob's error.",
         [q("60 * " + rate("deltaserve_tuning_jobs_total", "state"), "{{state}}")], "timeseries"),
        ("Training steps and examples / s", "short", "Optimizer updates and training examples processed per "
         "second over all running jobs.",
         [q(rate("deltaserve_tuning_steps_total"), "steps/s"), q(rate("deltaserve_tuning_examples_total"),
                                                                "examples/s")], "timeseries"),
        ("Training step time (p50 / p95 / p99)", "s", "One step: forward, backward and update, at the training "
         "threads' lower priority.",
         quantiles("deltaserve_tuning_step_seconds"), "timeseries"),
    ]),
    ("Store and lifecycle", [
        ("Store operations / s by op", "short", "Delta store operations (deltaserve_store_operations_total): get, "
         "put, resolve, list, labels, deletes, gc. With a shared store each includes registry round trips.",
         [q(rate("deltaserve_store_operations_total", "op"), "{{op}}")], "timeseries"),
        ("Store errors / s by op and code", "short", "Store operations that did not end OK. NOT_FOUND is a missing "
         "task or label; UNAVAILABLE, INTERNAL, DEADLINE_EXCEEDED are the store's own failures (alert "
         "DeltaserveStoreErrors); DATA_LOSS a corrupt blob.",
         [q(rate("deltaserve_store_operations_total", "op,code", NOT_OK), "{{op}} {{code}}")], "timeseries"),
        ("Store operation latency (p50 / p95 / p99) by op", "s", "Time one store operation takes.",
         quantiles("deltaserve_store_operation_duration_seconds", "op"), "timeseries"),
        ("Ready instances", "short", "Instances ready for calls (deltaserve_ready: model loaded, not draining).",
         [q("sum(deltaserve_ready{SEL})", "ready")], "stat"),
    ]),
    ("Model", [
        ("Served model", "none", "The model each instance serves (family, dtype, device, BLAS, parameters).",
         [{"expr": f"deltaserve_model_info{{{SEL}}}", "format": "table", "instant": True, "legendFormat": ""}],
         "table"),
        ("Model load time", "s", "Time the model took to load at start.",
         [q("max(deltaserve_model_load_seconds{SEL})", "load s")], "stat"),
    ]),
]


def build():
    panels = []
    pid = 1
    y = 0
    for row_title, row_panels in PANELS:
        panels.append({"type": "row", "title": row_title, "id": pid, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid += 1
        y += 1
        x = 0
        for title, unit, desc, targets, kind in row_panels:
            w = 6 if kind == "stat" else 12
            if x + w > 24:
                x = 0
                y += 8
            refs = [dict(t, refId=chr(ord("A") + i), datasource={"type": "prometheus", "uid": "${datasource}"})
                    for i, t in enumerate(targets)]
            panel = {
                "type": kind, "title": title, "description": desc, "id": pid,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": w, "x": x, "y": y},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {}, "targets": refs,
            }
            if kind == "timeseries":
                panel["options"] = {"legend": {"displayMode": "list", "placement": "bottom"},
                                    "tooltip": {"mode": "multi"}}
            if kind == "stat":
                panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                                    "colorMode": "value", "graphMode": "area"}
            panels.append(panel)
            pid += 1
            x += w
        y += 8
    return {
        "uid": "deltaserve",
        "title": "deltaserve",
        "description": "deltaserve: traffic, tenants, the multi-task scheduler, the delta cache and the model "
                       "(generated by deploy/grafana/make_dashboard.py).",
        "tags": ["deltaserve"],
        "timezone": "browser",
        "schemaVersion": 38,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0},
            {"name": "instance", "label": "Instance", "type": "query",
             "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "query": {"query": "label_values(deltaserve_model_info, instance)", "refId": "instance"},
             "definition": "label_values(deltaserve_model_info, instance)",
             "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "current": {}, "hide": 0},
        ]},
        "annotations": {"list": []},
        "panels": panels,
    }


if __name__ == "__main__":
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "deltaserve-dashboard.json")
    with open(out, "w") as f:
        json.dump(build(), f, indent=2)
        f.write("\n")
    print(out)
