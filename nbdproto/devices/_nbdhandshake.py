"""What NbdDevice asks of a remote export in the handshake, and what it makes of the answer: every meta context
the export has, selected; the export's transmission flags and block sizes as the device's capabilities; and a
connection made and negotiated (``connect_wire``)."""

from __future__ import annotations

import ssl

import nbdproto.client
import nbdproto.engine
from nbdproto.client import ClientNegotiation, NbdUri
from nbdproto.engine import (
    Event,
    Export,
    MetaContexts,
    OptionError,
    OptionGo,
    OptionListMetaContext,
    OptionSetMetaContext,
)
from nbdproto.serving import DeviceCapabilities
from nbdproto.sockets import connect_socket, negotiate_client
from nbdproto.tls import connection_context
from nbdproto.wire import BASE_ALLOCATION, InfoType, Option, TransmissionFlags

from ._nbdwire import Wire

__all__ = ["DiscoveringNegotiation", "capabilities_of", "connect_wire"]

TF = TransmissionFlags


class DiscoveringNegotiation(ClientNegotiation):
    """The usual handshake, except that where it would select base:allocation it first lists every context the
    export has (NBD_OPT_LIST_META_CONTEXT with no query), then selects them all."""

    def __init__(self, export_name: str, *, tls: bool, require_tls: bool) -> None:
        super().__init__(export_name, tls=tls, require_tls=require_tls, meta_contexts=(BASE_ALLOCATION,))
        self._listed = False

    def step(self, event: Event) -> Event | None:
        if isinstance(event, MetaContexts) and event.option == Option.LIST_META_CONTEXT:
            names = tuple(sorted(set(event.contexts.values())))
            self.meta_contexts = names
            if not names:
                return OptionGo(self.export_name, (InfoType.NAME, InfoType.DESCRIPTION, InfoType.BLOCK_SIZE))
            return OptionSetMetaContext(self.export_name, names)
        if isinstance(event, OptionError) and event.option == Option.LIST_META_CONTEXT:
            # A server that cannot list: ask for base:allocation alone, as any client would.
            return OptionSetMetaContext(self.export_name, (BASE_ALLOCATION,))
        send = super().step(event)
        if isinstance(send, OptionSetMetaContext) and not self._listed:
            self._listed = True
            return OptionListMetaContext(self.export_name, ())
        return send


def capabilities_of(export: Export, contexts: tuple[str, ...]) -> DeviceCapabilities:
    """What the device can do: the remote export's transmission flags, its block sizes where they are usable
    (a power-of-two minimum of at most 64 KiB, a preferred size of at most 32 MiB), and ``contexts``."""
    flags = export.flags
    minimum = export.minimum_block_size if export.block_sizes_known else 1
    minimum = minimum if minimum & (minimum - 1) == 0 and 1 <= minimum <= 65536 else 1
    preferred = min(max(export.preferred_block_size, minimum), 32 << 20)
    if preferred & (preferred - 1):
        preferred = 1 << (preferred.bit_length() - 1)
    maximum = min(export.maximum_payload, 0xFFFFFFFF) // minimum * minimum
    return DeviceCapabilities(
        can_write=not flags & TF.READ_ONLY,
        can_flush=bool(flags & TF.SEND_FLUSH),
        can_fua=bool(flags & TF.SEND_FUA),
        can_trim=bool(flags & TF.SEND_TRIM),
        can_zero=bool(flags & TF.SEND_WRITE_ZEROES),
        can_fast_zero=bool(flags & TF.SEND_FAST_ZERO),
        can_cache=bool(flags & TF.SEND_CACHE),
        can_multi_conn=bool(flags & TF.CAN_MULTI_CONN),
        rotational=bool(flags & TF.ROTATIONAL),
        minimum_block_size=minimum,
        preferred_block_size=preferred,
        maximum_payload=max(maximum, preferred),
        meta_contexts=contexts,
    )


def connect_wire(
    target: NbdUri, plan: ClientNegotiation, tls: ssl.SSLContext | None, timeout: float, request_timeout: float
) -> Wire:
    """A negotiated connection, not started yet: ``timeout`` bounds each step of connecting and the handshake,
    ``request_timeout`` each request afterwards (Wire)."""
    sock = connect_socket(target, timeout)  # its timeout stays on through the handshake
    tls = connection_context(target, plan.tls, tls)
    connection = negotiate_client(sock, plan, tls=tls, server_hostname=target.tls_hostname)
    connection.stream.sock.settimeout(None)  # the wire bounds its waits itself
    if not isinstance(connection.result, nbdproto.engine.HandshakeComplete):
        connection.stream.close()
        raise nbdproto.client.NegotiationError("the server ended the handshake without an export")
    return Wire(connection, request_timeout)
