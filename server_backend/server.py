"""The websocket server: sessions, the round loop, and the server side of the protocol's I/O.

One asyncio loop moves bytes and drives each connection's :class:`~flexsfl.core.wire.Connection`;
all torch work goes to the :class:`~.compute.ComputeWorker` thread. The round loop is written
once here; what differs between FlexP-SFL and the baselines is a :class:`~.strategy.Strategy`.

A client that sends anything the protocol refuses (garbage bytes, NaN tensors, wrong shapes, a
wrong token, a bundle for another model) gets an ``Error`` with a one-line reason and a close
code; it is logged, nothing it sent reaches the model, and every other session carries on.
A message the server itself may not send (:class:`~flexsfl.core.errors.InvalidState`: the
server's bug, not the client's) is logged as such and ends that session with ``SERVER_ERROR``
and close code 1011.

A client whose Hello says ``top >= 0`` is U-shaped (labels and output layers on the device): its
steps go to the middle through :mod:`.u_round`, which never sees a label.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import ssl
import time
from typing import Callable

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from flexsfl.core.bundle import layout_fingerprint
from flexsfl.core.errors import AuthError, ConfigError, ErrorCode, InvalidState, OrderError, ProtocolError, TensorError
from flexsfl.core.scoring import lm_summary
from flexsfl.core.tokens import read_admin_token
from flexsfl.core.wire import (
    ENCODINGS,
    Activations,
    Adapters,
    Bye,
    Connection,
    Error,
    Gradients,
    Hello,
    Limits,
    Metrics,
    Predictions,
    Role,
    RoundConfig,
    RoundEnd,
    RoundMode,
    TopGradients,
    Upload,
    Welcome,
    check_activations,
    check_tensors,
)

from flexsfl.server_backend.aggregation import ClientUpdate
from flexsfl.server_backend.clients import ClientRegistry, hash_token
from flexsfl.server_backend.compute import ComputeWorker
from flexsfl.server_backend.guards import (
    HELLO_MAX_BYTES,
    MAX_CONNECTIONS,
    MAX_UNAUTHENTICATED,
    STEP_TIMEOUT,
    UPLOAD_NORM_FACTOR,
    RateLimit,
    RoundLedger,
    check_upload_norms,
    reference_norms,
)
from flexsfl.server_backend.http import StatusEndpoints
from flexsfl.server_backend.middle_host import MiddleHost
from flexsfl.server_backend.state import ServerState
from flexsfl.server_backend.strategy import Strategy
from flexsfl.server_backend.tail_host import StepRequest, TailHost
from flexsfl.server_backend.u_round import UShaped, check_top, client_specs

__all__ = ["ServerConfig", "FlexServer", "frame_limit"]

log = logging.getLogger("flexsfl.server")


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765  # 0 picks a free port (see FlexServer.port)
    max_batch: int = 64  # largest B a client may send
    max_seq: int = 512  # largest T a client may send
    encodings: tuple[str, ...] = ENCODINGS  # what the server accepts for Z and g
    batching: bool = True  # cross-client batching of steps at the same split point
    hello_timeout: float = 30.0  # seconds a new connection has to say Hello
    tls_cert: str | None = None  # PEM certificate + key: serve wss://
    tls_key: str | None = None
    exit_when_done: bool = True  # after the last round, say Bye to everyone and return
    admin_token_file: str | None = None  # operator token for the HTTP status endpoints; None: loopback peers only
    linger: float = 0.0  # seconds to keep serving /metrics and the status page after the last round
    # Limits on what one connection, registered or not, can cost (docs/security.md).
    max_connections: int = MAX_CONNECTIONS  # open websocket connections; more are closed at once with 1013
    max_unauthenticated: int = MAX_UNAUTHENTICATED  # of them, connections that have not been welcomed yet
    hello_max_bytes: int = HELLO_MAX_BYTES  # the largest frame before Welcome (checked from the frame header)
    step_timeout: float = STEP_TIMEOUT  # seconds a client in a round may stay silent before it is dropped
    upload_norm_factor: float = UPLOAD_NORM_FACTOR  # per-tensor upload norm <= this x the global adapter's; 0 = off
    refusal_log_per_s: float = 5.0  # refusals logged per second at most (the rest are counted)
    # U-shaped clients: what the middle keeps between H and dL/dH (middle_host.py)
    middle_ttl: float = 60.0  # seconds a middle forward waits for its dL/dH before it is freed (the step is then refused)
    middle_max_pending: int = 256  # unfinished U-shaped steps held at most, over all clients
    middle_recompute: bool = False  # keep only Z and redo the middle's forward at dL/dH (less memory, more compute)

    def __post_init__(self) -> None:
        bad = [e for e in self.encodings if e not in ENCODINGS]
        if bad or not self.encodings:
            raise ConfigError(f"encodings {bad or '[]'} not supported; choose from {', '.join(ENCODINGS)}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("give both --tls-cert and --tls-key to serve wss://")
        for name in ("max_connections", "max_unauthenticated", "hello_max_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.step_timeout > 0:
            raise ConfigError(f"--step-timeout must be > 0 seconds, got {self.step_timeout}")
        if not self.middle_ttl > 0 or self.middle_max_pending < 1:
            raise ConfigError(f"--middle-ttl must be > 0 and --middle-max-pending >= 1 (got {self.middle_ttl}, "
                              f"{self.middle_max_pending})")


def frame_limit(host: TailHost, max_batch: int, max_seq: int) -> int:
    """The largest frame either side needs: Z or g at the batch limits, or every trainable tensor."""
    d = host.info.hidden_size
    z = max_batch * max_seq * d * 4
    state = sum(int(np.prod(p.shape)) * 4 for p in host.params.values())
    return int(1.1 * max(z, state)) + (1 << 20)


@dataclasses.dataclass(eq=False)
class Session:
    """One connected client."""

    client_id: str
    split: int
    backend: str
    profile: dict
    conn: Connection
    ws: ServerConnection
    top: int = -1  # Hello.top: >= 0 for a U-shaped client
    connected: float = dataclasses.field(default_factory=time.time)
    bytes_in: int = 0
    bytes_out: int = 0
    steps: int = 0
    token_sha256: str = ""  # the token it authenticated with: a rotation or revocation ends the session
    last_heard: float = dataclasses.field(default_factory=time.monotonic)  # last frame in or out
    in_step: bool = False  # the server is computing its step (its silence is not its fault)
    ledger: RoundLedger | None = None  # what the server served it this round (guards.py)
    logit_lambda: float = 0.0  # this round's λ of the logit-level alignment term (logit_kl rounds; 0 otherwise)
    upload: asyncio.Future | None = None  # the round's Upload, set by the round loop
    metrics: asyncio.Future | None = None  # the round's Metrics (sent after the client's evaluation)
    _send_lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)

    async def send(self, msg) -> None:
        async with self._send_lock:
            data = self.conn.send(msg)
            await self.ws.send(data)
            self.bytes_out += len(data)
            self.last_heard = time.monotonic()


class FlexServer:
    """Hosts the tail for every client and runs the rounds of a :class:`Strategy`."""

    def __init__(self, host: TailHost, strategy: Strategy, registry: ClientRegistry | None, state: ServerState,
                 config: ServerConfig = ServerConfig(), *, compute_threads: int | None = None, compute=None,
                 on_round_end: Callable[[int, dict[str, ClientUpdate]], dict] | None = None) -> None:
        self.host = host
        self.strategy = strategy
        self.registry = registry
        self.state = state
        self.config = config
        # compute: workers.make_compute's (a Ray WorkerPool for --workers N); by default one local thread
        self.worker = compute or ComputeWorker(host, batching=config.batching, threads=compute_threads,
                                    on_batch=lambda tags, s: self.state.log("batch", steps=tags, ms=round(1e3 * s, 3)))
        self.limits = Limits(max_frame_bytes=frame_limit(host, config.max_batch, config.max_seq))
        self.u = UShaped(MiddleHost(host, ttl_s=config.middle_ttl, max_pending=config.middle_max_pending,
                                    recompute=config.middle_recompute), self.worker, state)
        self.sessions: dict[str, Session] = {}
        self._changed = asyncio.Event()
        self.port: int | None = None
        self.round_id = 0  # next round to run
        self.ready = asyncio.Event()  # set once listening (port known)
        self.refused = 0  # connections closed for bad input, for reports
        # Called on the compute thread after each round (e.g. a simulation's evaluation); what it
        # returns is logged as the round's "eval" event. Its time is not counted as round time.
        self.on_round_end = on_round_end
        admin = read_admin_token(config.admin_token_file) if config.admin_token_file else None
        self._connections: set[ServerConnection] = set()
        self._unwelcomed: set[ServerConnection] = set()
        self._refusals = RateLimit(config.refusal_log_per_s)
        self._closing: set[asyncio.Task] = set()  # closes of dropped clients, in the background
        self.status = StatusEndpoints(self, admin_token=admin)  # /healthz, /metrics, the status page (http.py)

    # -- lifecycle -----------------------------------------------------------------------------
    async def serve(self) -> None:
        """Listen, run the strategy's rounds, return when they are done (or run until cancelled)."""
        specs = {n: tuple(p.shape) for n, p in self.host.params.items()}
        resumed = await asyncio.to_thread(self.state.load_global, specs)
        if resumed is not None:
            last, tensors = resumed
            self.host.load_state(tensors)
            self.round_id = last + 1
            log.info("resumed from %s after round %d", self.state.dir, last)
        ssl_ctx = None
        if self.config.tls_cert:
            ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_ctx.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        self.worker.start()
        expiry = asyncio.create_task(self.u.expire_loop())
        try:
            async with serve(
                self._handle,
                self.config.host,
                self.config.port,
                ssl=ssl_ctx,
                compression=None,  # deflate on float tensors costs ~50x time for ~nothing
                max_size=self.config.hello_max_bytes,  # raised to the frame limit at Welcome
                ping_interval=20,
                ping_timeout=60,
                process_request=self.status.process_request,  # plain HTTP on the same port
            ) as server:
                self.port = server.sockets[0].getsockname()[1]
                scheme = "wss" if ssl_ctx else "ws"
                log.info("serving %s://%s:%d (%s, frames <= %d bytes)", scheme, self.config.host, self.port,
                         self.strategy.name, self.limits.max_frame_bytes)
                self.ready.set()
                await self._run_rounds()
                self.state.log("phase", round=self.round_id, phase="finished")
                if self.config.exit_when_done:
                    for s in list(self.sessions.values()):
                        await self._close(s, Bye(reason="training finished"), 1000)
                    await asyncio.sleep(self.config.linger)  # a last scrape sees the final counts
                else:
                    await asyncio.Future()
        finally:
            expiry.cancel()
            self.worker.stop()

    # -- connections ---------------------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        cfg = self.config
        if len(self._connections) >= cfg.max_connections or len(self._unwelcomed) >= cfg.max_unauthenticated:
            self.refused += 1
            self._log_refusal(f"{ws.remote_address}", "BUSY", "too many connections (--max-connections)")
            await ws.close(1013, "too many connections; retry later")
            return
        self._connections.add(ws)
        self._unwelcomed.add(ws)
        try:
            await self._session(ws)
        finally:
            self._connections.discard(ws)
            self._unwelcomed.discard(ws)

    def _log_refusal(self, who: str, code: str, message: str) -> None:
        """Log a refusal, at most ``refusal_log_per_s`` a second; the rest are counted in the next line."""
        if not self._refusals.allow():
            return
        more = self._refusals.take_suppressed()
        log.warning("refused %s: %s%s", who, message, f" ({more} more refusals not logged)" if more else "")
        self.state.log("refused", client=who, code=code, message=message, **({"suppressed": more} if more else {}))

    async def _session(self, ws: ServerConnection) -> None:
        conn = Connection(Role.SERVER, self.limits)
        session: Session | None = None
        peer = ws.remote_address
        try:
            try:
                data = await asyncio.wait_for(ws.recv(), self.config.hello_timeout)
            except asyncio.TimeoutError:
                raise OrderError(f"no Hello within {self.config.hello_timeout:.0f} s; send Hello first") from None
            if isinstance(data, str):
                raise ProtocolError("text frames are not part of the protocol; send binary frames", ErrorCode.MALFORMED_FRAME)
            hello = conn.receive(data)
            if not isinstance(hello, Hello):
                return
            session = await self._welcome(hello, conn, ws, len(data))
            async for data in ws:
                if isinstance(data, str):
                    raise ProtocolError("text frames are not part of the protocol; send binary frames", ErrorCode.MALFORMED_FRAME)
                session.bytes_in += len(data)
                session.last_heard = time.monotonic()
                if self.registry is not None and not self.registry.still_valid(session.client_id, session.token_sha256):
                    raise AuthError(f"client {session.client_id!r} was revoked or its token rotated; "
                                    "reconnect with the current token")
                msg = conn.receive(data)
                if isinstance(msg, (Bye, Error)):
                    log.info("%s left: %s", session.client_id, getattr(msg, "reason", None) or getattr(msg, "message", ""))
                    break
                await self._dispatch(session, msg)
        except ProtocolError as e:
            who = session.client_id if session else f"{peer[0]}:{peer[1]}" if peer else "?"
            self.refused += 1
            self._log_refusal(who, e.code.name, str(e))
            try:
                data = Error.from_exception(e).serialize()
                await ws.send(data)
                await ws.close(e.close_code, str(e)[:120])
            except ConnectionClosed:
                pass
        except InvalidState as e:
            # This server asked its own Connection for something it may not send: our bug (or a
            # race with a closing session), never the client's; say so to both.
            who = session.client_id if session else f"{peer[0]}:{peer[1]}" if peer else "?"
            log.error("server error in the session of %s (not the client's fault): %s", who, e, exc_info=True)
            self.state.log("server_error", client=who, message=str(e))
            try:
                await ws.send(Error.from_exception(e).serialize())
                await ws.close(1011, "server error")
            except ConnectionClosed:
                pass
        except ConnectionClosed:
            log.info("%s disconnected", session.client_id if session else peer)
        finally:
            if session is not None:
                self.status.closed(session)
            if session is not None and session.top >= 0:
                await self.u.forget(session.client_id)
            if session is not None and self.sessions.get(session.client_id) is session:
                del self.sessions[session.client_id]
                for fut in (session.upload, session.metrics):
                    if fut is not None and not fut.done():
                        fut.set_exception(ConnectionError(f"{session.client_id} disconnected"))
                self._changed.set()

    async def _welcome(self, hello: Hello, conn: Connection, ws: ServerConnection, nbytes: int) -> Session:
        info = self.host.info
        if self.registry is not None and not self.registry.authenticate(hello.client_id, hello.token):
            raise AuthError(f"client {hello.client_id!r} is unknown or its token is wrong; check --client-id and the token file")
        if not 1 <= hello.split < info.num_blocks:
            raise AuthError(f"split {hello.split} is outside 1..{info.num_blocks - 1} for {info.id}", ErrorCode.BUNDLE_MISMATCH)
        check_top(info, hello.split, hello.top)
        why = self.strategy.refuse(None if hello.top < 0 else hello.top)
        if why is not None:
            raise AuthError(why, ErrorCode.BUNDLE_MISMATCH)
        want = layout_fingerprint(info, self.host.loaded.lora, hello.split)
        if hello.layout_hash != want:
            raise AuthError(
                f"the bundle's layout hash does not match this server's model ({info.id}, {info.task}/{info.num_labels}, "
                f"LoRA r={self.host.loaded.lora.r}) at split {hello.split}; export the bundle from the same model",
                ErrorCode.BUNDLE_MISMATCH,
            )
        encoding = next((e for e in hello.encodings if e in self.config.encodings), None)
        if encoding is None:
            raise ProtocolError(
                f"none of the client's encodings {list(hello.encodings)} is accepted (server: {list(self.config.encodings)})",
                ErrorCode.BAD_TENSOR,
            )
        old = self.sessions.get(hello.client_id)
        if old is not None:
            await self._close(old, Bye(reason="replaced by a newer connection of the same client"), 1000)
        session = Session(hello.client_id, hello.split, hello.backend, dict(hello.profile), conn, ws, top=hello.top,
                          bytes_in=nbytes, token_sha256=hash_token(hello.token))
        ws.protocol.max_message_size = self.limits.max_frame_bytes  # welcomed: the full frame limit from now on
        self._unwelcomed.discard(ws)
        await session.send(Welcome(
            session_id=secrets.token_hex(8),
            encoding=encoding,
            max_frame_bytes=self.limits.max_frame_bytes,
            info={"model": info.id, "strategy": self.strategy.name, "round": self.round_id, "task": info.task},
        ))
        self.sessions[hello.client_id] = session
        self.status.opened(session)
        self.state.client_seen(hello.client_id, hello.split, hello.backend, hello.profile)
        self.state.log("hello", client=hello.client_id, split=hello.split, top=hello.top, backend=hello.backend,
                       encoding=encoding, profile=dict(hello.profile))
        log.info("%s connected (split %d%s, %s, %s)", hello.client_id, hello.split,
                 f", top {hello.top}" if hello.top >= 0 else "", hello.backend, encoding)
        self._changed.set()
        return session

    async def _dispatch(self, s: Session, msg) -> None:
        info = self.host.info
        if isinstance(msg, Activations):
            check_activations(msg, hidden_size=info.hidden_size, max_batch=self.config.max_batch,
                              max_seq=self.config.max_seq, num_labels=info.num_labels, task=info.task)
            if msg.mode == "train":
                if s.ledger is None or s.upload is None or s.upload.done():
                    raise OrderError(f"train step {msg.step_id}: {s.client_id} is not in a running round")
                s.ledger.admit_step(msg.round_id, msg.step_id, int(msg.z.shape[0]))
            if s.top >= 0:  # U-shaped: Z -> the middle -> H (no labels reach this branch: the Connection refuses them)
                await self._u_step(s, self.u.activations(s, msg))
            elif msg.mode == "train":
                t0 = time.perf_counter()
                s.in_step = True
                try:
                    res = await self.worker.train(StepRequest(
                        s.split, np.asarray(msg.z), np.asarray(msg.attention_mask), np.asarray(msg.labels),
                        tag=f"{s.client_id}:{msg.round_id}:{msg.step_id}", align_lambda=s.logit_lambda,
                        z_ref=None if msg.z_ref is None else np.asarray(msg.z_ref)))  # Z': logit_kl rounds (the Connection checks)
                finally:
                    s.in_step = False
                if res.g is None:
                    raise TensorError(f"step {msg.step_id} refused: {res.error}", ErrorCode.NON_FINITE)
                s.steps += 1
                await s.send(Gradients(round_id=msg.round_id, step_id=msg.step_id, loss=res.loss, g=res.g,
                                       encoding=s.conn.encoding, align_loss=res.align_loss, align_ratio=res.align_ratio,
                                       align_gap=res.align_gap))
                self.state.log("step", client=s.client_id, round=msg.round_id, step=msg.step_id, loss=res.loss,
                               batch=int(msg.z.shape[0]), seq=int(msg.z.shape[1]),
                               server_ms=round(1e3 * (time.perf_counter() - t0), 3),
                               **({"align_ratio": res.align_ratio, "align_loss": res.align_loss} if msg.z_ref is not None else {}))
            else:
                logits = await self.worker.call(self._predict, s.split, np.asarray(msg.z), np.asarray(msg.attention_mask),
                                                None if msg.labels is None else np.asarray(msg.labels))
                await s.send(Predictions(round_id=msg.round_id, step_id=msg.step_id, logits=logits, encoding="fp32"))
        elif isinstance(msg, TopGradients):  # only in a U-shaped session (the Connection checks)
            await self._u_step(s, self.u.top_gradients(s, msg))
            s.steps += 1
        elif isinstance(msg, Upload):
            check_tensors(dict(msg.tensors), self._upload_specs(s), what="Upload")
            if msg.num_samples < 1:
                raise TensorError("Upload.num_samples must be >= 1 (the samples the adapters were trained on)")
            for name, a in msg.tensors.items():
                if not np.isfinite(a).all():
                    raise TensorError(f"Upload tensor {name!r} has non-finite values", ErrorCode.NON_FINITE)
            if s.ledger is not None and s.ledger.round_id == msg.round_id:
                allowed = s.ledger.allowed_samples()
                if msg.num_samples > allowed and not s.ledger.whole_model:
                    raise TensorError(f"Upload.num_samples {msg.num_samples} is more than the {allowed} samples this "
                                      f"server served {s.client_id} in round {msg.round_id}; refused")
                if msg.num_samples > allowed:  # whole model on the device: capped at τ x batch, logged
                    log.warning("%s: Upload.num_samples %d capped at %d (local_steps x batch_size)", s.client_id,
                                msg.num_samples, allowed)
                    msg = dataclasses.replace(msg, num_samples=allowed)
                check_upload_norms(msg.tensors, s.ledger.ref_norms or {}, self.config.upload_norm_factor)
            if s.upload is not None and not s.upload.done():
                s.upload.set_result(msg)
            else:
                # Too late for its round (timed out): release the client without using the upload.
                log.warning("%s: late upload for round %d ignored", s.client_id, msg.round_id)
                await s.send(RoundEnd(round_id=msg.round_id, info={"late": True}))
        elif isinstance(msg, Metrics):
            # Nested under one key: a client's keys can neither collide with nor forge the row's own fields.
            self.state.log("client_metrics", client=s.client_id, round=msg.round_id, split=s.split, metrics=dict(msg.metrics))
            if s.metrics is not None and not s.metrics.done():
                s.metrics.set_result(msg)

    async def _u_step(self, s: Session, answer) -> None:
        """Send what a U-shaped leg computes; the client is not silent while the server computes."""
        s.in_step = True
        try:
            msg = await answer
        finally:
            s.in_step = False
        await s.send(msg)

    def _predict(self, split: int, z: np.ndarray, mask: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        logits = self.host.predict(split, z, mask)
        if self.host.info.task == "causal_lm":
            # Full [B, T, V] logits would be huge: answer per sequence (summed NLL, tokens, correct).
            return lm_summary(logits, labels)
        return logits.astype(np.float32)

    def _upload_specs(self, s: Session) -> dict[str, tuple[int, ...]]:
        if self.strategy.mode is RoundMode.FULL:
            return {n: tuple(p.shape) for n, p in self.host.params.items()}
        if s.top >= 0:  # head and top blocks + task head (named as PEFT does)
            return client_specs(self.host.params, self.host.blocks, self.host.info.num_blocks, s.split, s.top)
        return self.host.head_specs(s.split)

    async def _close(self, s: Session, msg, code: int) -> None:
        try:
            await s.send(msg)
        except (InvalidState, ConnectionClosed):
            pass  # already closed (it said Bye or Error): nothing more may pass
        await s.ws.close(code)

    # -- rounds --------------------------------------------------------------------------------
    async def _wait_for_clients(self, n: int) -> None:
        while len(self.sessions) < n:
            log.info("waiting for clients: %d of %d connected", len(self.sessions), n)
            self._changed.clear()
            await self._changed.wait()

    async def _run_rounds(self) -> None:
        cfg = self.strategy.cfg
        while cfg.rounds == 0 or self.round_id < cfg.rounds:
            self.state.log("phase", round=self.round_id, phase="waiting")
            await self._wait_for_clients(cfg.min_clients)
            await self._run_round(self.round_id)
            self.round_id += 1

    async def _run_round(self, r: int) -> None:
        cfg = self.strategy.cfg
        chosen = [self.sessions[c] for c in self.strategy.select(r, list(self.sessions))]
        t0 = time.perf_counter()
        steps0 = self.worker.steps + self.u.middle.steps  # client steps served: tail and U-shaped middle
        server_steps0 = self.worker.server_steps  # optimizer steps (the fixed schedule: schedule.py)
        await asyncio.to_thread(self.state.start_round, r, [s.client_id for s in chosen])
        self.state.log("phase", round=r, phase="training", clients=[s.client_id for s in chosen])
        log.info("round %d: %s", r, ", ".join(f"{s.client_id}(s={s.split})" for s in chosen))
        started = []
        for s in chosen:
            plan = await self.worker.call(self.strategy.plan, r, s.client_id, s.split, self.host, _top(s))
            s.upload = asyncio.get_running_loop().create_future()
            s.ledger = RoundLedger(r, plan.local_steps, plan.batch_size, whole_model=plan.mode is RoundMode.FULL,
                                   ref_norms=reference_norms(plan.adapters) if plan.adapters is not None else None)
            s.last_heard = time.monotonic()
            s.logit_lambda = plan.align_lambda if plan.alignment == "logit_kl" else 0.0
            try:
                await s.send(RoundConfig(round_id=r, local_steps=plan.local_steps, batch_size=plan.batch_size, lr=plan.lr,
                                         optimizer=plan.optimizer, align_lambda=plan.align_lambda, mode=plan.mode,
                                         personal=plan.personal, adapters=plan.adapters is not None, align_top=plan.align_top,
                                         local_rule=plan.local_rule, head_steps=plan.head_steps, prox_mu=plan.prox_mu,
                                         alignment=plan.alignment, evaluate=cfg.scores(r)))
                if plan.adapters is not None:
                    await s.send(Adapters(round_id=r, tensors=dict(plan.adapters)))
                started.append(s)
            except (ConnectionClosed, InvalidState) as e:  # InvalidState: it closed while we planned
                log.warning("round %d: could not start %s: %s", r, s.client_id, e)
        uploads: dict[str, tuple[Session, Upload]] = {}
        if started:
            done = await self._wait_for(r, {s: s.upload for s in started}, "upload")
            for s in started:
                if s.upload in done and s.upload.exception() is None:
                    uploads[s.client_id] = (s, s.upload.result())
                elif not s.upload.done():
                    s.upload.cancel()
        dropped = sorted({s.client_id for s in started} - set(uploads))
        if dropped:
            log.warning("round %d: no upload from %s; left out of the aggregation", r, ", ".join(dropped))
        updates = {cid: ClientUpdate(dict(u.tensors), u.num_samples, s.split, _top(s)) for cid, (s, u) in uploads.items()}
        self.state.log("phase", round=r, phase="aggregating")
        t_agg = time.perf_counter()
        await self.worker.end_round()  # steps partial schedule groups; a Ray pool also averages its tails into self.host
        await self.worker.call(self.strategy.aggregate, r, self.host, updates)
        agg_s = time.perf_counter() - t_agg
        state = await self.worker.call(self.host.state)
        await asyncio.to_thread(self._persist, r, state, uploads)
        summary = {
            "clients": sorted(uploads), "dropped": dropped, "steps": self.worker.steps + self.u.middle.steps - steps0,
            "server_steps": self.worker.server_steps - server_steps0,
            "seconds": round(time.perf_counter() - t0, 3), "aggregate_seconds": round(agg_s, 4),
            "samples": sum(u.num_samples for _, u in uploads.values()),
        }
        await asyncio.to_thread(self.state.finish_round, r, summary)
        self.state.log("round", round=r, strategy=self.strategy.name, **summary,
                       bytes={cid: {"in": s.bytes_in, "out": s.bytes_out} for cid, (s, _) in uploads.items()})
        self.state.log("phase", round=r, phase="evaluating")
        ended = []
        for s, _ in uploads.values():
            s.metrics = asyncio.get_running_loop().create_future()
            try:
                await s.send(RoundEnd(round_id=r, info={"clients": len(uploads), "seconds": summary["seconds"]}))
                ended.append(s.metrics)
            except (ConnectionClosed, InvalidState) as e:  # InvalidState: it closed meanwhile
                log.warning("round %d: could not end the round for %s: %s", r, s.client_id, e)
        if ended:
            # Clients evaluate their personal model after RoundEnd, then report: wait, so that the
            # next RoundConfig never crosses an evaluation in flight.
            await self._wait_for(r, {s: s.metrics for s, _ in uploads.values() if s.metrics in ended}, "metrics")
            for f in ended:
                if f.done() and not f.cancelled():
                    f.exception()  # retrieved: a client that left is already logged
        if self.on_round_end is not None:
            evals = await self.worker.call(self.on_round_end, r, updates)
            self.state.log("eval", round=r, **evals)
        log.info("round %d done in %.1f s (%d clients, %d steps)", r, summary["seconds"], len(uploads), summary["steps"])

    async def _wait_for(self, r: int, waits: dict[Session, asyncio.Future], what: str) -> set[asyncio.Future]:
        """Wait for every future, at most ``round_timeout``; a session silent for ``step_timeout`` is dropped
        (its future fails, it leaves ``sessions`` at once, so it no longer counts toward --min-clients)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.strategy.cfg.round_timeout
        pending = {f for f in waits.values() if not f.done()}
        while pending and loop.time() < deadline:
            tick = min(deadline - loop.time(), max(0.05, self.config.step_timeout / 4))
            _, pending = await asyncio.wait(pending, timeout=tick)
            now = time.monotonic()
            for s, f in waits.items():
                # A whole-model round (FedAvg, local) trains and evaluates on the device with no
                # steps on the wire: only --round-timeout bounds it.
                whole = s.ledger is not None and s.ledger.whole_model
                if not f.done() and not s.in_step and not whole and now - s.last_heard > self.config.step_timeout:
                    self._drop(s, f"silent for {now - s.last_heard:.0f} s while the server waited for its {what} "
                                  f"(--step-timeout {self.config.step_timeout:g})", r)
        return {f for f in waits.values() if f.done()}

    def _drop(self, s: Session, why: str, r: int) -> None:
        log.warning("round %d: dropped %s: %s", r, s.client_id, why)
        self.state.log("dropped", client=s.client_id, round=r, reason=why)
        if self.sessions.get(s.client_id) is s:
            del self.sessions[s.client_id]
            self._changed.set()
        for fut in (s.upload, s.metrics):
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionError(f"{s.client_id} dropped: {why}"))
        # 1013: try again later. A silent peer may never answer the close handshake: close in the background.
        task = asyncio.create_task(s.ws.close(1013, "silent past the step deadline"))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _persist(self, r: int, state: dict, uploads: dict) -> None:
        self.state.save_global(r, state)
        for cid, (_, u) in uploads.items():
            self.state.save_personal(cid, r, dict(u.tensors))
            self.state.client_trained(cid, u.num_samples)


def _top(s: Session) -> int | None:
    """A session's top as strategies and aggregation take it: u, or None for head/tail."""
    return s.top if s.top >= 0 else None

