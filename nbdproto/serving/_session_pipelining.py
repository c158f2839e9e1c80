"""The pipelined half of a server session's transmission (a device with ``submit``: ``pipeline``,
``pipelined_batch``, ``pipeline_sent``), and what it shares with the inline half in ``_session_transmission``:
the reply buffers kept for reads and giving them back for a read's budget, and answering requests while
shutting down."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from nbdproto.engine import ErrorReply, Event, ReadData, ReadRequest, Request, ServerConnection, WriteRequest
from nbdproto.wire import Errno

from ._budget import MemoryShare, RequestBudget, request_cost
from ._carry_out import OnError
from ._device import BlockDevice
from ._pipeline import CarryOutPart, Pipeline, PipelineStep, StartRequests, WaitForRoom, submitting
from ._reply_buffers import ReplyBuffers
from ._steps import Work, streamed_part

__all__ = ["SessionPipelining", "SHUTTING_DOWN", "written_already"]

SHUTTING_DOWN = "the server is shutting down"


def written_already(request: Work) -> bool:
    """A write received in place (WriteRequest.in_place): its data is in the device already, so shutting down
    answers it as carried out, not with ESHUTDOWN (which says it was not)."""
    return type(request) is WriteRequest and request.in_place


class SessionPipelining:
    """The pipelined half of ServerSessionLogic's transmission (which sets every attribute below up)."""

    engine: ServerConnection
    share: MemoryShare | None
    on_device_error: OnError | None
    shutting_down: bool
    _reply_buffers: ReplyBuffers | None

    @property
    def device(self) -> BlockDevice:
        raise NotImplementedError

    def pipeline(self, wake: Callable[[], None]) -> Pipeline | None:
        """For a device that takes calls without waiting for them (``submit``): the pipeline that carries this
        connection's requests out on it (nbdproto.serving.Pipeline: ``wake`` is called, from any thread, when
        replies are ready). None for any other device."""
        if not submitting(self.device):
            return None
        self._reply_buffers = ReplyBuffers(share=self.share)  # the reads' buffers, kept once sent (pipeline_sent)
        return Pipeline(self.device, self.engine.meta_contexts, self.on_device_error, wake)

    def pipeline_sent(self, replies: Iterable[Event], in_flight: int) -> None:
        """A pipelined driver sent ``replies`` (with the budget's lock held, where the driver has one), and its
        request budget now holds ``in_flight`` bytes: the buffers of the reads among them are kept for reads
        to come (nbdproto.serving.ReplyBuffers), as a reply buffer costs zeroing and page faults to make anew
        (perf: a tenth of a proxy's CPU for nbdcopy's reads). Nothing is cut back here, even with nothing in
        flight (a client's next round wants the buffers): the driver calls ``pipeline_idle`` when another
        connection is about to wait for the memory."""
        kept = self._reply_buffers
        if kept is None:
            return
        buffers = [
            reply.data.obj
            for reply in replies
            if type(reply) is ReadData and type(reply.data) is memoryview and type(reply.data.obj) is bytearray
        ]
        if buffers:
            kept.keep(buffers, in_flight)

    def pipeline_idle(self) -> None:
        """Nothing is in flight on a pipelined connection: what its reply buffers keep beyond their bound is let
        go, its share of the server's memory given back (ReplyBuffers.cut_back)."""
        if self._reply_buffers is not None:
            self._reply_buffers.cut_back()

    def _take_kept_back(self, length: int) -> bool:
        """A read's budget, taken after giving back what reused reply buffers held; False if it still does not
        fit (the read waits for budget, as without them)."""
        kept = self._reply_buffers
        if kept is None or not kept.kept:
            return False
        kept.release()
        assert self.share is not None
        return self.share.try_take(length)

    def pipelined_batch(
        self, batch: Iterable[Work], budget: RequestBudget, share: MemoryShare
    ) -> Iterator[PipelineStep]:
        """The requests of ``batch`` admitted to a pipeline (``pipeline()``), as steps for its driver, in order:
        each within the connection's request ``budget`` (added to it here) and its ``share`` of the server's
        memory, or after a WaitForRoom while they are spent; collected into StartRequests, the ones already
        collected started before any wait; refused with ESHUTDOWN while shutting down; a streamed write's
        parts carried out in order (CarryOutPart). The driver advances the steps where it touches the engine
        and the budget (under its lock, if other threads do too) and does what each says."""
        requests: list[Request] = []
        costs: list[int] = []
        kept = self._reply_buffers
        for work in batch:
            if type(work) is ReadRequest and kept is not None and not self.shutting_down and not budget.full:
                # The commonest, a read with a buffer kept of its length: the buffer's share of the memory
                # budget is the read's cost (request_cost: its length), handed over instead of given back and
                # taken again.
                buffer = kept.held_for(work.length)
                if buffer is not None:
                    work.buffer = buffer
                    budget.add(work.length)
                    requests.append(work)
                    costs.append(work.length)
                    continue
            if streamed_part(work):
                yield CarryOutPart(work)
                continue
            request: Request = work  # type: ignore[assignment]  # (not cast(): a call a request)
            if self.shutting_down and self.refused_shutting_down(request):
                continue
            cost = request_cost(request)
            if budget.full or not (share.try_take(cost) or self._take_kept_back(cost)):
                if requests:
                    yield StartRequests(requests, costs)  # what is collected must be under way before waiting
                    requests, costs = [], []
                yield WaitForRoom(cost)
            budget.add(cost)
            if type(request) is ReadRequest and kept is not None:
                request.buffer = kept.kept_for(request.length)  # (else the pipeline makes one, off any lock)
            requests.append(request)
            costs.append(cost)
        if requests:
            if kept is not None:
                kept.busy(budget.bytes)
            yield StartRequests(requests, costs)

    def refused_shutting_down(self, request: Request) -> bool:
        """When the server is shutting down and ``request`` was not carried out already (a write received in
        place was): answer it with ESHUTDOWN and say True."""
        if self.shutting_down and not written_already(request):
            self.refuse_shutting_down(request)
            return True
        return False

    def refuse_shutting_down(self, request: Request) -> None:
        """Answer ``request`` with ESHUTDOWN: the server is shutting down and takes no new work."""
        self.engine.send(ErrorReply(request.cookie, Errno.ESHUTDOWN, SHUTTING_DOWN))
