"""The human text of a CostReport (what `iotplat cost` prints without --json)."""

from __future__ import annotations

from iotplat.cost.estimate import CostReport, Line, Option

AMOUNT = 10


def _amount(value: object) -> str:
    return f"{value:,.2f}"


def _headline(report: CostReport) -> str:
    key = f"{report.platform}/{report.environment}"
    own = next((o for o in report.options if o.spec_target), None)
    if own is None:
        return (f"{key}: the local target runs throw-away hosts on this machine; the same hosts elsewhere, "
                f"in {report.currency} a month:")
    return (f"{key} on {own.title}: {_amount(own.monthly)} {report.currency} a month "
            f"(figures below in {report.currency})")


def _prices(report: CostReport) -> str:
    text = f"prices: iotplat's price table, {report.note} (taken {report.taken}"
    text += "; sources in iotplat/cost/prices.yaml and in --json)"
    if report.overrides:
        text += ", with " + ", then ".join(report.overrides) + " merged over it"
    return text


def render_text(report: CostReport) -> list[str]:
    lines: list[Line] = [line for o in report.options for line in o.lines]
    host_w = max([4, *(len(line.host or "") for line in lines)])
    item_w = max([5, *(len(line.item) for line in lines)])
    detail_w = max([10, *(len(line.detail) for line in lines)])
    width = 2 + host_w + 2 + item_w + 2 + detail_w + 2 + AMOUNT
    out = [_headline(report), f"({report.note})", ""]

    def block(option: Option) -> None:
        out.append(f"{option.title} ({option.role})")
        if option.error:
            out.append(f"  no figure: {option.error}")
        else:
            for line in option.lines:
                out.append(f"  {(line.host or ''):<{host_w}}  {line.item:<{item_w}}  {line.detail:<{detail_w}}  "
                           f"{_amount(line.monthly):>{AMOUNT}}")
            out.append(f"  {'total':<{width - 2 - AMOUNT}}{_amount(option.monthly):>{AMOUNT}}")
        out.append("")

    for option in report.options:
        block(option)
    side = " | ".join(f"{o.title} {_amount(o.monthly)}" if not o.error else f"{o.title}: no figure"
                      for o in report.options)
    out.append(f"side by side, {report.currency} a month: {side}")
    out.append("")
    out.append("how these figures are made:")
    out.extend(f"  - {a}" for a in report.assumptions)
    out.append("not counted:")
    out.extend(f"  - {n}" for n in report.not_counted)
    out.append(_prices(report))
    return out
