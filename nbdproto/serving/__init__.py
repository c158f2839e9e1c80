"""nbdproto.serving: what an NBD server does with the engine, without I/O, shared by both server backends.

A backend's server is an I/O loop around these pieces; everything it decides that is not moving bytes lives
here, once:

- ``_device``: the block-device protocol (``BlockDevice``) both servers call, and how a device wants to be
  called (``Dispatch``); ``_export``: what an export advertises, derived from what its device can do
  (``DeviceCapabilities``, ``ExportSpec``); ``_export_table``: exports that come and go while a server runs
  (``ExportTable``).
- ``_carry_out``: a request becomes device calls and the reply event (``carry_out``).
- ``_session``: one connection's logic (``ServerSessionLogic``): the handshake steps, resolving exports,
  transmission as explicit steps for the driver (``_steps``), shutdown.
- ``_core``: a server apart from its I/O (``ServerCore``): exports, the settings every session gets, who is
  served (``_admission``; client certificates' subjects and the patterns they must match: ``_subject``), the
  log (``_log``).
- Policy a client cannot escape: time limits (``_limits``), the memory budget (``_budget``), the receive
  sizes (``_receive_size``); read replies' buffers used again on TLS connections and in pipelines
  (``_reply_buffers``); a pipelined connection's replies, sent by the thread that made them (``_reply_outbox``).

This is the plumbing namespace: applications write devices and start servers through ``nbdproto``,
``nbdproto.devices`` and a backend; backends and tools that drive the engine themselves use these names. They
are loaded on first use (``lazy_names``), so that a client's start-up does not pay for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazynames import lazy_names

if TYPE_CHECKING:
    from ._admission import ClientCount, ClientInfo, ClientRefused, ConnectionPolicy, certificate_subject, takes_client
    from ._budget import DEFAULT_MEMORY_LIMIT, BudgetShare, MemoryBudget, MemoryShare, RequestBudget, request_cost
    from ._carry_out import (
        DeviceCall,
        OnError,
        ReadView,
        WriteView,
        carry_out,
        carry_out_all,
        client_message,
        device_calls,
        error_reply_for,
        nbd_errno,
        read_view_of,
        reply_for,
        write_view_ended,
        write_view_of,
    )
    from ._core import (
        ACCEPT_HOLD_BACK,
        ClientResolver,
        Exports,
        Resolver,
        ServerCore,
        ServerOptions,
        SessionSettings,
        Stoppable,
        current_connection,
        enter_connection,
    )
    from ._device import BlockDevice, Buffer, Completions, Dispatch, dispatch_of
    from ._export import DeviceCapabilities, ExportSpec, answer_export_request, capabilities_of, export_for
    from ._export_table import ExportTable
    from ._limits import DEFAULT_LIMITS, ServerLimits
    from ._log import ConnectionLog
    from ._pipeline import CarryOutPart, Pipeline, PipelineStep, StartRequests, WaitForRoom, submitting
    from ._receive_size import RECV_SIZE, STREAM_RECV_SIZE, ReceiveSize
    from ._reply_buffers import KEPT_REPLY_BYTES, ReplyBuffers
    from ._reply_outbox import SEND_NOW_AT_MOST, Chunk, ReplyOutbox, held_by, pieces_of
    from ._session import ServerSessionLogic
    from ._steps import (
        FINISHED,
        FLUSH_AT,
        READY_IN_A_ROW,
        RECEIVE,
        RECEIVE_READY,
        SEND,
        STREAM_WRITES_OVER,
        BatchEnd,
        Step,
        WaitForBudget,
        Work,
        streamed_part,
    )
    from ._subject import Subject, SubjectPattern, parse_subject, subject_of, write_subject

_LAZY = {
    "BlockDevice": "._device",
    "Buffer": "._device",
    "Dispatch": "._device",
    "dispatch_of": "._device",
    "Completions": "._device",
    "Pipeline": "._pipeline",
    "submitting": "._pipeline",
    "StartRequests": "._pipeline",
    "WaitForRoom": "._pipeline",
    "CarryOutPart": "._pipeline",
    "PipelineStep": "._pipeline",
    "DeviceCapabilities": "._export",
    "capabilities_of": "._export",
    "export_for": "._export",
    "ExportSpec": "._export",
    "answer_export_request": "._export",
    "ExportTable": "._export_table",
    "ServerLimits": "._limits",
    "DEFAULT_LIMITS": "._limits",
    "RequestBudget": "._budget",
    "MemoryBudget": "._budget",
    "BudgetShare": "._budget",
    "MemoryShare": "._budget",
    "DEFAULT_MEMORY_LIMIT": "._budget",
    "request_cost": "._budget",
    "ClientInfo": "._admission",
    "ConnectionPolicy": "._admission",
    "ClientRefused": "._admission",
    "ClientCount": "._admission",
    "certificate_subject": "._admission",
    "takes_client": "._admission",
    "Subject": "._subject",
    "SubjectPattern": "._subject",
    "parse_subject": "._subject",
    "subject_of": "._subject",
    "write_subject": "._subject",
    "DeviceCall": "._carry_out",
    "device_calls": "._carry_out",
    "reply_for": "._carry_out",
    "error_reply_for": "._carry_out",
    "nbd_errno": "._carry_out",
    "client_message": "._carry_out",
    "OnError": "._carry_out",
    "carry_out": "._carry_out",
    "carry_out_all": "._carry_out",
    "ReadView": "._carry_out",
    "read_view_of": "._carry_out",
    "WriteView": "._carry_out",
    "write_view_of": "._carry_out",
    "write_view_ended": "._carry_out",
    "RECV_SIZE": "._receive_size",
    "STREAM_RECV_SIZE": "._receive_size",
    "ReceiveSize": "._receive_size",
    "ConnectionLog": "._log",
    "ACCEPT_HOLD_BACK": "._core",
    "Exports": "._core",
    "Resolver": "._core",
    "ClientResolver": "._core",
    "SessionSettings": "._core",
    "ServerOptions": "._core",
    "ServerCore": "._core",
    "Stoppable": "._core",
    "current_connection": "._core",
    "enter_connection": "._core",
    "ReplyBuffers": "._reply_buffers",
    "ReplyOutbox": "._reply_outbox",
    "Chunk": "._reply_outbox",
    "pieces_of": "._reply_outbox",
    "held_by": "._reply_outbox",
    "SEND_NOW_AT_MOST": "._reply_outbox",
    "KEPT_REPLY_BYTES": "._reply_buffers",
    "BatchEnd": "._steps",
    "ServerSessionLogic": "._session",
    "Work": "._steps",
    "FLUSH_AT": "._steps",
    "RECEIVE": "._steps",
    "RECEIVE_READY": "._steps",
    "READY_IN_A_ROW": "._steps",
    "STREAM_WRITES_OVER": "._steps",
    "SEND": "._steps",
    "FINISHED": "._steps",
    "Step": "._steps",
    "WaitForBudget": "._steps",
    "streamed_part": "._steps",
}

__all__ = [
    "lazy_names",
    "BlockDevice",
    "Buffer",
    "Dispatch",
    "dispatch_of",
    "Completions",
    "Pipeline",
    "submitting",
    "StartRequests",
    "WaitForRoom",
    "CarryOutPart",
    "PipelineStep",
    "DeviceCapabilities",
    "export_for",
    "ExportSpec",
    "answer_export_request",
    "capabilities_of",
    "ExportTable",
    "ServerLimits",
    "DEFAULT_LIMITS",
    "RequestBudget",
    "MemoryBudget",
    "BudgetShare",
    "MemoryShare",
    "DEFAULT_MEMORY_LIMIT",
    "request_cost",
    "ClientInfo",
    "ConnectionPolicy",
    "ClientRefused",
    "ClientCount",
    "certificate_subject",
    "Subject",
    "SubjectPattern",
    "parse_subject",
    "subject_of",
    "write_subject",
    "takes_client",
    "DeviceCall",
    "device_calls",
    "reply_for",
    "error_reply_for",
    "nbd_errno",
    "client_message",
    "OnError",
    "carry_out",
    "carry_out_all",
    "ReadView",
    "read_view_of",
    "WriteView",
    "write_view_of",
    "write_view_ended",
    "RECV_SIZE",
    "STREAM_RECV_SIZE",
    "ReceiveSize",
    "ConnectionLog",
    "ACCEPT_HOLD_BACK",
    "Exports",
    "Resolver",
    "ClientResolver",
    "SessionSettings",
    "ServerOptions",
    "ServerCore",
    "Stoppable",
    "current_connection",
    "enter_connection",
    "BatchEnd",
    "ServerSessionLogic",
    "Work",
    "FLUSH_AT",
    "RECEIVE",
    "RECEIVE_READY",
    "READY_IN_A_ROW",
    "STREAM_WRITES_OVER",
    "SEND",
    "FINISHED",
    "Step",
    "WaitForBudget",
    "streamed_part",
    "ReplyBuffers",
    "ReplyOutbox",
    "Chunk",
    "pieces_of",
    "held_by",
    "SEND_NOW_AT_MOST",
    "KEPT_REPLY_BYTES",
]

if not TYPE_CHECKING:  # type checkers see the imports above; a __getattr__ would hide misspelt names
    __getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())
