"""The figures side by side: each ledgercore figure with its reference from the same
run and the ratio (ledgercore ÷ reference), as JSON rows and as rich tables."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from bench.stats import ratio


def _latency(summary: dict[str, Any] | None) -> tuple[float | None, float | None]:
    summary = summary or {}
    return summary.get("p50"), summary.get("p99")


def _row(section: str, figure: str, value: Any, unit: str, reference: str, reference_value: Any
         ) -> dict[str, Any]:
    if isinstance(value, tuple):
        ratios: Any = tuple(ratio(v, r) for v, r in zip(value, reference_value or (None, None)))
    else:
        ratios = ratio(value, reference_value)
    return {"section": section, "figure": figure, "value": value, "unit": unit,
            "reference": reference, "reference_value": reference_value, "ratio": ratios}


def comparisons(results: dict[str, Any]) -> list[dict[str, Any]]:
    ref, lc = results["reference"], results["ledgercore"]
    rows: list[dict[str, Any]] = []
    ceiling = ref.get("http_ceiling", {})
    sync = ceiling.get("sync", {}).get("levels", {})
    asyn = ceiling.get("async", {}).get("levels", {})
    insert_1 = ref.get("psycopg", {}).get("1", {}).get("rows_per_second")
    insert_100 = ref.get("psycopg", {}).get("100", {}).get("rows_per_second")
    kinds = results.get("machine", {}).get("handler_kinds", {})
    own = kinds.get("adminAdjustBalance", "sync")
    variants = {"sync": sync, "async": asyn}
    order = [own, "async" if own == "sync" else "sync"]
    section = f"commands (POST adminAdjustBalance, an {own} handler)"
    for level, figures in lc.get("commands", {}).items():
        for variant in order:
            rows.append(_row(section, f"{level} concurrent: commands/s (200)", figures["ok_per_second"],
                             "/s", f"HTTP ceiling, {variant} handler",
                             variants[variant].get(level, {}).get("per_second")))
        rows.append(_row(section, f"{level} concurrent: latency p50 / p99", _latency(figures["latency_ms"]),
                         "ms", f"HTTP ceiling, {own} handler",
                         _latency(variants[own].get(level, {}).get("latency_ms"))))
        rows.append(_row(section, f"{level} concurrent: events appended/s",
                         figures["events_per_second"], "/s", "psycopg, 1 row per commit", insert_1))
        rows.append(_row(section, f"{level} concurrent: commands/s (200)", figures["ok_per_second"],
                         "/s", "eventsourcing naive, 1 save per command (sequential)",
                         ref.get("naive_eventsourcing", {}).get("events_per_second")))
    apart = lc.get("commands_projector_apart", {})
    section = ("commands, projector apart (no projector process during the ladder; the read "
               "models applied after it)")
    for level, figures in apart.get("levels", {}).items():
        rows.append(_row(section, f"{level} concurrent: commands/s (200)", figures["ok_per_second"],
                         "/s", "HTTP ceiling, async handler", asyn.get(level, {}).get("per_second")))
        rows.append(_row(section, f"{level} concurrent: commands/s (200)", figures["ok_per_second"],
                         "/s", "the same level with the projector running",
                         lc.get("commands", {}).get(level, {}).get("ok_per_second")))
    if apart.get("projected_events_per_second"):
        rows.append(_row(section, f"project-log applying the ladder's {apart['projected_events']:,} "
                         "events: events/s", apart["projected_events_per_second"], "/s",
                         "psycopg, 100 rows per commit", insert_100))
    section = "projection lag (response → read model)"
    lag = lc.get("lag", {})
    for transport, name in (("direct", "direct"), ("kafka", "Kafka")):
        if transport not in lag:
            continue
        figures = lag[transport]
        label = f"{name}, {figures['achieved_per_second']:.0f} commands/s: p50 / p99"
        rows.append(_row(section, label, _latency(figures), "ms",
                         "command latency, same run (p50 / p99)",
                         _latency(figures["load"]["latency_ms"])))
        if transport == "kafka" and "direct" in lag:
            rows.append(_row(section, label, _latency(figures), "ms", "direct transport lag",
                             _latency(lag["direct"])))
    section = "placement (launches racing for the last nodes of a SKU)"
    for key, figures in lc.get("placement", {}).items():
        if not key.startswith("writers_"):
            continue
        label = (f"{figures['writers']} writer(s), {figures['contenders']} contenders, "
                 f"{figures['nodes']} nodes: claims/s")
        rows.append(_row(section, label, figures["claims_per_second"], "/s",
                         "attempts/s (admitted + refused)", figures["attempts_per_second"]))
    adm = lc.get("admissions", {})
    if adm.get("levels"):
        section = (f"admissions (POST submitV3ComputeLaunch through HTTP, {adm['nodes']} nodes, "
                   f"{adm['users']} funded users)")
        commands = lc.get("commands", {})
        for level, figures in adm["levels"].items():
            same = commands.get(level, {})
            rows.append(_row(section, f"{level} concurrent: admissions/s (202)",
                             figures["admissions_per_second"], "/s",
                             "commands/s (adminAdjustBalance), same concurrency",
                             same.get("ok_per_second")))
            rows.append(_row(section, f"{level} concurrent: latency p50 / p99",
                             _latency(figures["latency_ms"]), "ms",
                             "adminAdjustBalance latency, same concurrency",
                             _latency(same.get("latency_ms"))))
            rows.append(_row(section, f"{level} concurrent: {adm['lag_projection']} read model lag"
                             " p50 / p99", _latency(figures["lag"]), "ms",
                             "admission latency, same run (p50 / p99)",
                             _latency(figures["latency_ms"])))
    section = "replay"
    rep = lc.get("replay", {})
    if "catch_up" in rep:
        rows.append(_row(section, f"catch_up over {rep['catch_up']['events']:,} events: events/s",
                         rep["catch_up"]["events_per_second"], "/s", "psycopg, 100 rows per commit",
                         insert_100))
    if "rebuild" in rep:
        rows.append(_row(section, f"rebuild from {rep['rebuild']['events']:,} events: events/s",
                         rep["rebuild"]["events_per_second"], "/s", "psycopg, 100 rows per commit",
                         insert_100))
    if "audit_replay" in rep:
        rows.append(_row(section, f"audit replay (replay --as-of) of {rep['audit_replay']['events']:,}"
                         " events: events/s", rep["audit_replay"]["events_per_second"], "/s",
                         "psycopg, 100 rows per commit", insert_100))
    if "append" in rep:
        rows.append(_row(section, f"in-process append (app.save of 100 events, "
                         f"{rep['generator_workers']} processes at once): events/s",
                         rep["append"]["events_per_second"], "/s",
                         "psycopg, 100 rows per commit", insert_100))
    if "generation" in rep:
        rows.append(_row(section, f"history generation (decide and append, "
                         f"{rep['generator_workers']} processes): events/s",
                         rep["generation"]["events_per_second"], "/s",
                         "psycopg, 100 rows per commit", insert_100))
    query_kind = kinds.get("getBillingBalance", "sync")
    section = f"queries (GET getBillingBalance, a {query_kind} handler, 1 concurrent)"
    get_ref = _latency(ceiling.get(query_kind, {}).get("get", {}).get("latency_ms"))
    for kind, label in (("hit", "cache hit (same user)"), ("miss", "cache miss (each user once)")):
        if kind in lc.get("queries", {}):
            rows.append(_row(section, f"{label}: p50 / p99", _latency(lc["queries"][kind]["latency_ms"]),
                             "ms", f"HTTP ceiling GET, {query_kind} handler", get_ref))
    section = "peak memory (max RSS)"
    memory = results.get("peak_rss_mib", {})
    base = "HTTP ceiling server (sync)"
    for name, value in memory.items():
        if name.startswith("HTTP ceiling") or name == "load generator (ceiling runs)":
            continue
        if name.startswith("load generator"):
            reference = "load generator (ceiling runs)"
        elif name.startswith("server") or name in ("relay", "projector"):
            reference = base
        else:
            reference = "—"
        rows.append(_row(section, name, value, "MiB", reference, memory.get(reference)))
    return rows


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, (tuple, list)):
        return " / ".join(_fmt(v) for v in value)
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _fmt_ratio(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, (tuple, list)):
        return " / ".join(_fmt_ratio(v) for v in value)
    return f"{value:.2f}×" if value < 10 else f"{value:.0f}×"


def print_report(console: Console, results: dict[str, Any]) -> None:
    table = Table(title=f"ledgercore bench {results['run']} "
                  f"({'quick' if results['parameters']['quick'] else 'full'}, "
                  f"{results['machine']['cpus']} cores)", show_lines=False)
    for name, justify in (("figure", "left"), ("ledgercore", "right"), ("unit", "left"),
                          ("reference (same run)", "left"), ("reference", "right"),
                          ("ratio", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    section = None
    for row in results["comparisons"]:
        if row["section"] != section:
            if section is not None:
                table.add_section()
            section = row["section"]
            table.add_row(f"[bold]{section}[/]", "", "", "", "", "")
        table.add_row("  " + row["figure"], _fmt(row["value"]), row["unit"], row["reference"],
                      _fmt(row["reference_value"]), _fmt_ratio(row["ratio"]))
    console.print(table)

    ref = results["reference"]
    refs = Table(title="references (machine limits, same run)")
    for name in ("reference", "figure", "value"):
        refs.add_column(name, justify="right" if name == "value" else "left")
    for rows, data in ref.get("psycopg", {}).items():
        refs.add_row(f"psycopg inserts, {rows} row(s)/commit", "rows/s", _fmt(data["rows_per_second"]))
    naive = ref.get("naive_eventsourcing")
    if naive:
        refs.add_row("eventsourcing naive (sequential)", "events/s", _fmt(naive["events_per_second"]))
    broker = ref.get("broker")
    if broker:
        refs.add_row("broker, kafka-python acks=all", "produced/s", _fmt(broker["produce_per_second"]))
        refs.add_row("broker, consumer group", "consumed/s", _fmt(broker["consume_per_second"]))
    for variant, data in ref.get("http_ceiling", {}).items():
        cells = ", ".join(f"{level}: {_fmt(figures['per_second'])}"
                          for level, figures in data["levels"].items())
        refs.add_row(f"HTTP ceiling, {variant} handler", "req/s by concurrency", cells)
    console.print(refs)

    cpu = Table(title="cores used during the command runs (of "
                f"{results['machine']['cpus']}): server (+ its projector process) / Postgres / "
                      "load generator / other")
    cpu.add_column("concurrency")
    for name in ("ledgercore", "projector apart", "HTTP ceiling, sync", "HTTP ceiling, async"):
        cpu.add_column(name, justify="right")

    def cores(figures: dict[str, Any] | None) -> str:
        share = (figures or {}).get("cpu_share")
        if not share:
            return "—"
        server = f"{share.get('server', 0):.2f}"
        projector = share.get("server's projector")
        if projector is not None:
            server += f" + {projector:.2f}"
        return " / ".join([server] + [f"{share.get(k, 0):.2f}" for k in ("postgres", "load generator",
                                                                          "other")])

    for level, figures in results["ledgercore"].get("commands", {}).items():
        cpu.add_row(level, cores(figures),
                    cores(results["ledgercore"].get("commands_projector_apart", {})
                          .get("levels", {}).get(level)),
                    cores(ref.get("http_ceiling", {}).get("sync", {}).get("levels", {}).get(level)),
                    cores(ref.get("http_ceiling", {}).get("async", {}).get("levels", {}).get(level)))
    console.print(cpu)

    checks = Table(title="integrity (refuses to report on any difference)")
    for name in ("database", "users/accounts", "acknowledged", "refused", "no answer",
                 "events checked", "result"):
        checks.add_column(name)
    for label, check in results["integrity"].items():
        checks.add_row(label, _fmt(check.get("users", check.get("accounts"))),
                       _fmt(check.get("acknowledged_commands")), _fmt(check.get("refused_commands")),
                       _fmt(check.get("unanswered_commands")),
                       _fmt(check.get("events_scanned", check.get("events"))),
                       "[green]OK[/]" if check["ok"] else "[red]FAILED[/]")
    console.print(checks)
    statuses: dict[str, int] = {}
    for figures in results["ledgercore"].get("commands", {}).values():
        for status, count in figures["statuses"].items():
            statuses[status] = statuses.get(status, 0) + count
    console.print("command statuses over the ladder: "
                  + ", ".join(f"{k}: {v:,}" for k, v in sorted(statuses.items())))
