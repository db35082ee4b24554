# Types of the compiled core (native/, Rust with PyO3), for the type checker.
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from typing import Any, final

def check_tls(
    certificate: bytes | None = None, client_certificate: bytes | None = None, client_key: bytes | None = None
) -> None: ...

class OtlpExporter:
    def __init__(
        self,
        signal: str,
        url: str,
        headers: Sequence[tuple[str, str]],
        resource: Mapping[str, Any],
        scopes: Sequence[tuple[str, str]],
        *,
        gzip: bool = False,
        timeout: float = 10.0,
        max_queue_size: int = 2048,
        max_queue_bytes: int = 16 << 20,
        max_export_batch_size: int = 512,
        schedule_delay: float = 5.0,
        max_retry_elapsed: float = 300.0,
        attribute_value_length_limit: int | None = None,
        truncation_marker: bool = False,
        certificate: bytes | None = None,
        client_certificate: bytes | None = None,
        client_key: bytes | None = None,
    ) -> None: ...
    def scope(self, name: str, version: str) -> int | None: ...
    def record_span(
        self,
        scope: int,
        trace_id: int,
        span_id: int,
        parent_span_id: int,
        flags: int,
        trace_state: str,
        name: str,
        kind: int,
        start: int,
        end: int,
        attributes: Mapping[str, Any],
        events: Sequence[tuple[str, int, Mapping[str, Any]]] | None = None,
        status_code: int = 0,
        status_message: str = "",
        dropped_attributes: int = 0,
        dropped_events: int = 0,
    ) -> None: ...
    def record_log(
        self,
        scope: int,
        time: int,
        observed_time: int,
        severity_number: int,
        severity_text: str,
        body: object,
        attributes: Mapping[str, Any],
        trace_id: int = 0,
        span_id: int = 0,
        flags: int = 0,
        event_name: str = "",
    ) -> None: ...
    def record_metrics(self, scope: int, families: Sequence[Family], start: int, now: int) -> None: ...
    def force_flush(self, timeout: float) -> bool: ...
    def shutdown(self, timeout: float) -> bool: ...
    def stats(self) -> dict[str, Any]: ...

@final
class Family:
    def __init__(
        self,
        name: str,
        help: str,
        unit: str,
        label_names: Sequence[str],
        bounds: Sequence[float] | None = None,
        bound_labels: Sequence[str] | None = None,
        otlp_name: str | None = None,
        otlp_unit: str | None = None,
        *,
        gauge: bool = False,
        max_series: int = 0,
    ) -> None: ...
    def add(self, labels: Sequence[str], value: float) -> bool: ...
    def set(self, labels: Sequence[str], value: float) -> bool: ...
    def finish(self, labels: Sequence[str]) -> bool: ...
    def touch(self, labels: Sequence[str]) -> None: ...
    # trace_id and span_id (both non-zero): the measurement becomes its bucket's exemplar,
    # replacing the one before (pass them only for a span whose trace is exported).
    def observe(self, labels: Sequence[str], value: float, trace_id: int = 0, span_id: int = 0) -> bool: ...
    def values(self) -> list[tuple[list[str], float]]: ...
    def rows(self) -> list[tuple[list[str], list[int], float, int, float, float]]: ...
    # Per series with any: (label values, [(bucket index, trace id, span id, value, unix ns)]).
    def exemplars(self) -> list[tuple[list[str], list[tuple[int, int, int, float, int]]]]: ...
    def render(self, openmetrics: bool = False) -> str: ...

def render(families: Sequence[Family], openmetrics: bool = False) -> str: ...

# trace_id and span_id: the server span's, when its trace is exported (0: no exemplar).
def record_request(
    requests: Family,
    duration: Family,
    method: str,
    route: str,
    status: str,
    seconds: float,
    trace_id: int = 0,
    span_id: int = 0,
) -> tuple[bool, bool]: ...
def float_to_go_string(value: float) -> str: ...

class LineBuffer:
    def __init__(self, hold: float = 0.05, flush_bytes: int = 65536, max_bytes: int = 1048576) -> None: ...
    def take(self) -> tuple[str, int]: ...
    def lost(self, lines: int) -> None: ...
    def flush(self) -> None: ...
    def close(self, timeout: float) -> bool: ...
    def stats(self) -> dict[str, Any]: ...

class RequestLine:
    def __init__(
        self,
        service_fields: str,
        stdout: tuple[LineBuffer, Callable[[], object]] | None = None,
        exporter: OtlpExporter | None = None,
        scope: int = 0,
    ) -> None: ...
    def render(
        self,
        created: float,
        level: int,
        method: str,
        path: str,
        route: str,
        status: str,
        seconds: float,
        trace_id: int = 0,
        span_id: int = 0,
    ) -> str: ...

def end_request(
    span: tuple[OtlpExporter, tuple[Any, ...]] | None,
    requests: Family | None,
    duration: Family | None,
    method: str,
    route: str,
    status: str,
    seconds: float,
    log: tuple[OtlpExporter, tuple[Any, ...]]
    | tuple[RequestLine, float, int, str, int, int, int, int]
    | None = None,
    trace_id: int = 0,
    span_id: int = 0,
) -> tuple[bool, bool]: ...
def end_call(
    span: tuple[OtlpExporter, tuple[Any, ...]] | None,
    family: Family | None,
    labels: Sequence[str],
    seconds: float,
    trace_id: int = 0,
    span_id: int = 0,
) -> bool: ...

class PreparedSpan:
    """A client call's span prepared once: scope, name, kind and fixed attributes in OTLP form."""

    def __init__(
        self, exporter: OtlpExporter, scope: int, name: str, kind: int, attributes: dict[str, Any]
    ) -> None: ...
    @property
    def exporter(self) -> OtlpExporter: ...

def end_prepared(
    call: PreparedSpan,
    trace_id: int,
    span_id: int,
    parent_span_id: int,
    flags: int,
    trace_state: str,
    start: int,
    end: int,
    status_code: int,
    status_message: str,
    events: list[tuple[str, int, dict[str, Any]]] | None,
    dropped_events: int,
    family: Family | None,
    labels: Sequence[str],
    seconds: float,
    exemplar: bool,
) -> bool: ...

@final
class ServerSpans:
    def __init__(
        self,
        seam: object,
        exporter: OtlpExporter,
        provider: object,
        head: object,
        bound: int,
        parent_based: bool,
        python_ids: bool,
        root_random: bool,
        random_bit: int,
        limits: object,
    ) -> None: ...
    def start(self, name: str, parent: object = None) -> ServerSpan | None: ...

@final
class ServerSpan:
    trace_id: int
    span_id: int
    flags: int
    sampled: bool
    name: str
    start_time: int
    end_time: int | None
    dropped_events: int
    @property
    def context(self) -> Any: ...
    @property
    def parent(self) -> Any: ...
    @property
    def kind(self) -> Any: ...
    @property
    def status(self) -> Any: ...
    @property
    def events(self) -> list[tuple[str, int, dict[str, Any]]]: ...
    @property
    def attributes(self) -> dict[str, Any]: ...
    def get_span_context(self) -> Any: ...
    def exemplar_ids(self) -> tuple[int, int]: ...
    def is_recording(self) -> bool: ...
    def set_attribute(self, key: str, value: object) -> None: ...
    def set_attributes(self, attributes: Mapping[str, object]) -> None: ...
    def add_event(
        self, name: str, attributes: Mapping[str, object] | None = None, timestamp: int | None = None
    ) -> None: ...
    def add_link(self, context: object, attributes: Mapping[str, object] | None = None) -> None: ...
    def update_name(self, name: str) -> None: ...
    def set_status(self, status: object, description: str | None = None) -> None: ...
    def record_exception(
        self,
        exception: BaseException,
        attributes: Mapping[str, object] | None = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None: ...
    def end(self, end_time: int | None = None) -> None: ...
    def __enter__(self) -> ServerSpan: ...
    def __exit__(self, *args: object) -> bool: ...
    def end_request(
        self,
        scope: Mapping[str, Any],
        method: str,
        route: str,
        status: int,
        seconds: float,
        requests: Family | None = None,
        duration: Family | None = None,
        log: object = None,
    ) -> tuple[bool, bool]: ...

@final
class Sender:
    status: Any
    def __init__(self, send: Callable[[Any], Any]) -> None: ...
    def __call__(self, message: Any) -> Any: ...

@final
class CallTimer:
    """Times one instrumentation's client calls in the core (native/src/call.rs)."""

    def __init__(
        self,
        fallback: Callable[[Any, int, int, float, BaseException | None], object],
        overflow: Callable[[Any], object],
        guard: object,
    ) -> None: ...
    def time(
        self,
        call: PreparedSpan,
        parent: ServerSpan,
        family: Family,
        labels: Sequence[str],
        awaited: Awaitable[Any],
        exported: bool,
        slow: float,
        context: object,
    ) -> TimedCall: ...

@final
class TimedCall:
    """A client call's awaitable, timed: its span and duration recorded when it returns."""

    def __await__(self) -> Generator[Any, None, Any]: ...
    def __iter__(self) -> TimedCall: ...
    def __next__(self) -> Any: ...
    def send(self, value: Any) -> Any: ...
    def throw(self, kind: Any, value: Any = None, traceback: Any = None) -> Any: ...
    def close(self) -> None: ...
