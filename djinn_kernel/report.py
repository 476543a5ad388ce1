"""Plain-text renderings of engine status, shared by `djinn status`, the magics and text fallbacks."""

from __future__ import annotations


def format_size(nbytes: int) -> str:
    return "unlimited" if nbytes >= 1 << 60 else f"{nbytes / 2**30:.2f} GiB"


def format_status(status: dict) -> str:
    """A plain-text table of the device, models and sessions of a daemon or of the in-process engine."""
    gib = 2**30
    mem, dev = status["memory"], status["device"]
    where = f"daemon pid {status['daemon']['pid']}" if "daemon" in status else "in-process engine"
    lines = [f"{where} on {dev.get('name', dev['type'])}"]
    if "total" in dev:
        lines.append(f"device memory: {(dev['total'] - dev['free']) / gib:.2f} of {dev['total'] / gib:.2f} GiB used")
    pool = mem["host_pool"]
    lines.append(
        f"session budget {format_size(mem['budget'])}, sessions on device {mem['session_gpu_bytes'] / gib:.3f} GiB, "
        f"host pool {pool['used'] / gib:.3f} of {pool['reserved'] / gib:.3f} GiB reserved"
        f" ({'pinned' if pool['pinned'] else 'pageable'}), page-outs {mem['page_outs']}, page-ins {mem['page_ins']}"
    )
    for m in status["models"]:
        lines.append(f"model {m['name']}: {m['num_layers']} layers, {m['weight_bytes'] / gib:.3f} GiB weights, {m['dtype']}")
    lines.append(f"{'session':>8} {'owner':<12} {'model':<16} {'state':<9} {'gpu MiB':>9} {'host MiB':>9}")
    for s in status["sessions"]:
        lines.append(
            f"{s['id']:>8} {s['owner']:<12} {s['model']:<16} {s['state']:<9} "
            f"{s['memory']['gpu_bytes'] / 2**20:>9.2f} {s['memory']['host_bytes'] / 2**20:>9.2f}"
        )
    return "\n".join(lines)
