"""Fake torch_npu.npu.streams (torch_npu/npu/streams.py): Stream and Event, as ordering only.

The fake runs every kernel when it is called, so a stream or an event never makes anything
wait; what they carry is the order an NPU would enforce (torch_npu._core: StreamState), so that
a kernel touching memory another stream is still writing is refused instead of silently right.
Stream(): a new stream of the current device (upstream takes one from torch_npu's pool);
wait_stream = wait_event(record_event()), as upstream; synchronize() makes the host wait.
"""
from torch_npu import _core


class Stream:
    def __new__(cls, device=None, priority=0, stream_id=None, **kwargs):
        self = super().__new__(cls)
        self._state = _core.STREAMS[stream_id] if stream_id is not None else _core.new_stream()
        self.device_index = _core.STATE.current
        self.priority = priority
        return self

    @property
    def stream_id(self):
        return self._state.id

    @property
    def device(self):
        import torch
        return torch.device('npu', self.device_index)

    def wait_event(self, event):
        event.wait(self)

    def wait_stream(self, stream):
        self.wait_event(stream.record_event())

    def record_event(self, event=None):
        if event is None:
            event = Event()
        event.record(self)
        return event

    def query(self):
        return True

    def synchronize(self):
        _core.LEDGER.add('sync', 'Stream.synchronize')
        _core.host_waits(self._state.snapshot())

    def __eq__(self, other):
        return isinstance(other, Stream) and other._state is self._state

    def __hash__(self):
        return hash(self._state.id)

    def __repr__(self):
        return f'<torch_npu.npu.Stream (fake) device=npu:{self.device_index} stream_id={self._state.id}>'


class Event:
    """streams.py Event: record() marks how far a stream had got; wait() orders a stream after it;
    synchronize() makes the host wait (and is recorded in the ledger)."""

    def __init__(self, enable_timing=False, blocking=False, interprocess=False):
        self.recorded = False
        self._mark = {}

    def record(self, stream=None):
        state = stream._state if stream is not None else _core.current_stream()
        self._mark = state.snapshot()
        self.recorded = True

    def wait(self, stream=None):
        state = stream._state if stream is not None else _core.current_stream()
        state.wait(self._mark)

    def query(self):
        return True

    def synchronize(self):
        _core.LEDGER.add('event', 'Event.synchronize')
        _core.host_waits(self._mark)
