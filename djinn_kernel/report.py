"""Renderings shared by `djinn status`, the magics and the handles' notebook displays: plain text and HTML."""

from __future__ import annotations

import html


def format_size(nbytes: int) -> str:
    return "unlimited" if nbytes >= 1 << 60 else f"{nbytes / 2**30:.2f} GiB"


def format_status(status: dict) -> str:
    """A plain-text table of the device, models and sessions of a daemon or of the in-process engine; for a
    cluster (`djinn serve --ray`), each engine with its own memory."""
    gib = 2**30
    dev = status["device"]
    where = f"daemon pid {status['daemon']['pid']}" if "daemon" in status else "in-process engine"
    if "engines" in status:  # a cluster: no memory of its own, each engine has its manager
        lines = [f"{where} on a Ray cluster: {dev['engines']} engines, {dev['alive']} alive"]
        for e in status["engines"]:
            state = "alive" if e["alive"] else f"dead ({e.get('error') or 'lost'})"
            lines.append(
                f"engine {e['name']} on {e['device']} (pid {e['pid']}, node {e.get('node')}): {state}, models "
                f"{', '.join(map(str, e['models'])) or 'none'}, sessions {e['sessions'] or 'none'}"
            )
            if e.get("memory"):
                lines.extend(f"  {line}" for line in _memory_lines(e["memory"]))
    else:
        lines = [f"{where} on {dev.get('name', dev['type'])}"]
        if "total" in dev:
            lines.append(f"device memory: {(dev['total'] - dev['free']) / gib:.2f} of {dev['total'] / gib:.2f} GiB used")
        lines.extend(_memory_lines(status["memory"]))
    for m in status["models"]:
        lines.append(f"model {m['name']}: {m['num_layers']} layers, {m['weight_bytes'] / gib:.3f} GiB weights, {m['dtype']}")
        if m.get("streaming"):
            lines.append(f"  {streaming_text(m['streaming'])}")
    lines.append(
        f"{'session':>8} {'owner':<12} {'model':<16} {'state':<9} {'gpu MiB':>9} {'host MiB':>9} {'disk MiB':>9}"
    )
    for s in status["sessions"]:
        lines.append(
            f"{s['id']:>8} {s['owner']:<12} {s['model']:<16} {s['state']:<9} "
            f"{s['memory']['gpu_bytes'] / 2**20:>9.2f} {s['memory']['host_bytes'] / 2**20:>9.2f} "
            f"{s['memory'].get('disk_bytes', 0) / 2**20:>9.2f}"
        )
    return "\n".join(lines)


def _memory_lines(mem: dict) -> list[str]:
    gib = 2**30
    pool = mem["host_pool"]
    lines = [
        f"session budget {format_size(mem['budget'])}, sessions on device {mem['session_gpu_bytes'] / gib:.3f} GiB, "
        f"host pool {pool['used'] / gib:.3f} of {pool['reserved'] / gib:.3f} GiB reserved"
        f" ({'pinned' if pool['pinned'] else 'pageable'}), page-outs {mem['page_outs']}, page-ins {mem['page_ins']}"
        f", paging policy {mem.get('policy', 'lru')}"
    ]
    spill = mem.get("spill")
    if spill:
        lines.append(
            f"disk tier {spill['folder']}: {spill['used'] / gib:.3f} of {format_size(spill['capacity'])} in "
            f"{spill['files']} file(s), spilled {spill['spills']}, read back {spill['unspills']}"
        )
    return lines


def streaming_text(stats: dict) -> str:
    """``24 layers resident, 16 streamed through 2 ring slots of 0.59 GiB; 9.46 GiB copied per token``."""
    per_token = stats["bytes_per_token"]
    traffic = "no forward yet" if per_token is None else f"{per_token / 2**30:.2f} GiB copied per token"
    return (
        f"{len(stats['resident_layers'])} layers resident, {len(stats['streamed_layers'])} streamed through "
        f"{stats['ring_slots']} ring slots of {stats['slot_bytes'] / 2**30:.2f} GiB; {traffic}"
    )


# Notebook renderings of the API handles (duck-typed: this module imports nothing from the API). ----------------
_MUTED = "color:#666;font-size:90%"
_TOUCHED = "background:#ffe08a;border-radius:2px"


def pause_where(info: dict) -> str:
    """``layer 15 (output), prefill`` or ``model.layers.1.mlp (input), decode step 3``."""
    where = f"layer {info['layer']}" if info.get("layer") is not None else info["path"]
    step = "prefill" if info["token_step"] == 0 else f"decode step {info['token_step']}"
    return f"{where} ({info['side']}), {step}"


def run_text(run) -> str:
    """A run as plain text: its state, where it waits, and the generated text with real line breaks."""
    head = f"run {run.id} {run.state}"
    if run.paused:
        head += f" at {pause_where(run._snapshot['pause'])}"
    head += f", {len(run.tokens)} token(s)"
    if run.error:
        head += f" — {run.error}"
    return f"{head}\n{run.text}" if run.text else head


def run_html(run) -> str:
    """The prompt and the generated text, tokens that steering or an edit touched highlighted."""
    head = html.escape(run_text(run).split("\n", 1)[0])
    model = run.session.model
    prompt = html.escape("".join(model.token_strings(run.prompt_ids)))
    pieces = model.token_strings(run.tokens) if run.tokens else []
    body = "".join(
        f"<span style='{_TOUCHED}' title='steered'>{html.escape(p)}</span>" if touched else html.escape(p)
        for p, touched in zip(pieces, run.touched)
    )
    legend = " <span style='{}'>highlighted</span>: steered or edited".format(_TOUCHED) if any(run.touched) else ""
    return (
        f"<div><b>{head}</b>{legend}"
        f"<div style='{_MUTED};white-space:pre-wrap'>{prompt}</div>"
        f"<div style='white-space:pre-wrap;font-family:monospace'>{body}</div></div>"
    )


def pause_text(pause) -> str:
    return (
        f"paused at {pause_where(pause.info)} · {pause.path} · activation {list(pause.shape)} {pause.dtype} · "
        f"{pause.info['edits']} edit(s)"
    )


def pause_html(pause) -> str:
    return f"<b>{html.escape(pause_text(pause))}</b>"


def breakpoints_text(rows: list[dict]) -> str:
    if not rows:
        return "no breakpoints"
    return "\n".join(
        f"{b['id']:>3}  {b['path']} ({b['side']})  tokens={b['tokens'] or 'all'}  "
        f"hits={b['hits']}{'/' + str(b['max_hits']) if b['max_hits'] else ''}"
        f"{'  when ' + b['when'] if b.get('when') else ''}"
        for b in rows
    )


def breakpoints_html(rows: list[dict]) -> str:
    if not rows:
        return "<i>no breakpoints</i>"
    cells = "".join(
        "<tr>"
        + "".join(
            f"<td style='padding:1px 8px'>{html.escape(str(v))}</td>"
            for v in (
                b["id"],
                b["path"],
                b["side"],
                b["tokens"] or "all",
                f"{b['hits']}{'/' + str(b['max_hits']) if b['max_hits'] else ''}",
                b.get("when") or "",
            )
        )
        + "</tr>"
        for b in rows
    )
    head = "".join(f"<th style='padding:1px 8px'>{h}</th>" for h in ("id", "where", "side", "tokens", "hits", "when"))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>"
