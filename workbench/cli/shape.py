"""`workbench shape`: run the shaping proxy (added RTT, capped rate) until Ctrl-C."""

from __future__ import annotations

import click

from workbench.net.shape import PRESETS, ShapingProxy


def parse_address(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """(host, port) from "HOST:PORT", "[V6]:PORT" or "PORT" (then on `default_host`)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host = default_host
    host = host.strip("[]") or default_host
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.BadParameter(f"{text!r} is not an address; write HOST:PORT or PORT")
    return host, int(port)


def _preset_help() -> str:
    lines = [f"{p.name}: rtt {p.rtt_ms:g} ms, {p.mbps:g} Mbit/s" for p in PRESETS.values()]
    return "Link from the DADI paper (" + "; ".join(lines) + "). --rtt-ms/--mbps override it."


@click.command("shape")
@click.argument("listen")
@click.argument("upstream")
@click.option("--preset", type=click.Choice(list(PRESETS)), help=_preset_help())
@click.option("--rtt-ms", type=click.FloatRange(min=0), help="Round-trip time added, in ms.")
@click.option("--mbps", type=click.FloatRange(min=0), help="Rate cap in Mbit/s (0: none).")
@click.option(
    "--per-connection",
    is_flag=True,
    help="Give every connection its own --mbps instead of sharing one link (the default).",
)
@click.option("--burst", "burst_bytes", type=click.IntRange(min=1), help="Bucket depth, bytes.")
def shape(
    listen: str,
    upstream: str,
    preset: str | None,
    rtt_ms: float | None,
    mbps: float | None,
    per_connection: bool,
    burst_bytes: int | None,
) -> None:
    """Proxy TCP from LISTEN to UPSTREAM, adding round-trip time and capping the rate.

    LISTEN is PORT or HOST:PORT (port 0 picks a free one); UPSTREAM is HOST:PORT, e.g. a
    registry. Each direction delays data by half the RTT and passes the token bucket of
    the link; runs until Ctrl-C, then prints what it carried.

        workbench shape --preset cross-region 5001 127.0.0.1:5000
    """
    import trio

    chosen = PRESETS[preset] if preset else None
    proxy = ShapingProxy(
        listen=parse_address(listen),
        upstream=parse_address(upstream),
        rtt_ms=rtt_ms if rtt_ms is not None else (chosen.rtt_ms if chosen else 0.0),
        mbps=mbps if mbps is not None else (chosen.mbps if chosen else None),
        shared=not per_connection,
        burst_bytes=burst_bytes,
    )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(proxy.serve)
            click.echo(
                f"shaping {proxy.listen[0]}:{port} -> {proxy.upstream[0]}:{proxy.upstream[1]}"
                f" ({proxy.describe()}{f', preset {preset}' if preset else ''}); Ctrl-C stops"
            )

    try:
        trio.run(main)
    except BaseException as exc:
        cause = _sole(exc)
        if isinstance(cause, KeyboardInterrupt):
            counters = proxy.statistics()
            click.echo(
                f"stopped: {counters.accepted} connections, {counters.bytes_up:,} bytes up, "
                f"{counters.bytes_down:,} bytes down, "
                f"{counters.upstream_failures} upstream failures"
            )
            return
        if isinstance(cause, OSError):
            raise click.ClickException(f"cannot listen on {listen}: {cause}") from exc
        raise


def _sole(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member groups (trio wraps what a nursery raises)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
