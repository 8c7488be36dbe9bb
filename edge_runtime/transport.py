"""The device side's only I/O: a websocket client that drives a trainer through the protocol.

:func:`run_client` connects, says Hello, and then does what the server asks: for each round, the
local steps (Z out, g back; for a U-shaped trainer Z out, H back, dL/dH out, g back, and no
labels on the wire; in an align_top round Z' travels with Z and H' with H; in a head/tail
logit_kl round Z' travels with Z and the server's g holds the alignment term), the upload of θ_k,
an evaluation of the personal model on the local test split, and the round's metrics. If the
server goes away it reconnects with exponential backoff (with jitter) and carries on with the
personal head it kept; a refusal that retrying cannot fix (unknown client, wrong token, a bundle
for another model) ends it with that error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import random
import ssl
import threading
import time
import urllib.parse
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from flexsfl.core.errors import AuthError, ConfigError, ErrorCode, FlexSFLError, OrderError, ProtocolError
from flexsfl.core.scoring import Score, perplexity
from flexsfl.edge_runtime.trainer import HeadTrainer, RoundSettings, Step, Trainer
from flexsfl.edge_runtime.u_trainer import UTrainer
from flexsfl.core.wire import (
    CLIENT_ID_RE,
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
    MiddleOutput,
    Predictions,
    Role,
    RoundConfig,
    RoundEnd,
    RoundMode,
    TopGradients,
    Upload,
    Welcome,
)

__all__ = ["ClientOptions", "ClientReport", "run_client"]

log = logging.getLogger("flexsfl.edge")

# Refusals that reconnecting cannot fix.
_FATAL = {ErrorCode.UNAUTHORIZED, ErrorCode.BUNDLE_MISMATCH, ErrorCode.BAD_VERSION}


@dataclasses.dataclass(frozen=True)
class ClientOptions:
    server: str  # ws://host:port or wss://host:port
    client_id: str
    token: str
    encodings: tuple[str, ...] = ENCODINGS  # preference order for Z and g
    profile: dict = dataclasses.field(default_factory=dict)  # device profile sent in Hello
    ca_file: str | None = None  # CA bundle for wss:// with a private CA
    open_timeout: float = 10.0
    max_retries: int = 0  # reconnect attempts in a row before giving up; 0 = forever
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    healthy_s: float = 10.0  # a connection up this long has served: the backoff starts again from backoff_initial
    evaluate: bool = True  # score the local test split after each round the server asks it (RoundConfig.evaluate)

    def __post_init__(self) -> None:
        if not self.server.startswith(("ws://", "wss://")):
            raise ConfigError(f"server URL {self.server!r} must start with ws:// or wss://")
        if not CLIENT_ID_RE.fullmatch(self.client_id):
            raise ConfigError(f"client id {self.client_id!r} is invalid: use 1-128 letters, digits, '.', '_' or '-' "
                              "(starting with a letter or digit)")
        if self.ca_file is not None and not self.server.startswith("wss://"):
            raise ConfigError(f"--ca-file is for wss:// servers; {self.server!r} is not TLS")
        bad = [e for e in self.encodings if e not in ENCODINGS]
        if bad or not self.encodings:
            raise ConfigError(f"encodings {bad} not supported; choose from {', '.join(ENCODINGS)}")


@dataclasses.dataclass
class ClientReport:
    rounds: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # the Metrics sent, per round
    reconnects: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    reason: str = ""  # why it stopped (the server's Bye)
    # The last Metrics sent, until the server's next message on the connection that carried it shows it arrived
    # (the server answers a round's Metrics with the next RoundConfig or Bye); a reconnect sends it again
    # (_resend_metrics). A message on a newer connection confirms nothing: the frame may have died with the old one.
    unconfirmed: Metrics | None = None


class _Link:
    """One open connection: the protocol state plus byte counters."""

    def __init__(self, ws: ClientConnection, conn: Connection, report: ClientReport) -> None:
        self.ws, self.conn, self.report = ws, conn, report
        self.encoding = "fp32"
        self.carries_unconfirmed = False  # report.unconfirmed went out on this connection

    async def send_metrics(self, m: Metrics) -> None:
        """Send ``m`` and track it as the report's unconfirmed Metrics, carried by this connection."""
        self.report.unconfirmed = m
        await self.send(m)
        self.carries_unconfirmed = True

    async def send(self, msg) -> None:
        data = self.conn.send(msg)
        await self.ws.send(data)
        self.report.bytes_sent += len(data)

    async def recv(self):
        data = await self.ws.recv()
        if isinstance(data, str):
            raise ProtocolError("the server sent a text frame; is this a flexsfl server?")
        self.report.bytes_received += len(data)
        msg = self.conn.receive(data)
        if isinstance(msg, Error):
            exc = AuthError if msg.code in _FATAL else ProtocolError
            raise exc(f"server refused: {msg.message}", msg.code)
        return msg


async def run_client(trainer: Trainer, opts: ClientOptions, *,
                     stop: asyncio.Event | threading.Event | None = None) -> ClientReport:
    """Train until the server says Bye (returns) or refuses for good (raises). ``stop`` (set from
    this loop or, a :class:`threading.Event`, from another thread): return at the next lost connection
    instead of reconnecting.

    The reconnect backoff starts again only after a connection that stayed up ``opts.healthy_s``: a
    server that welcomes and then fails at once is retried ever more slowly (and given up on after
    ``max_retries``), not hammered every half second."""
    report = ClientReport()
    m = trainer.bundle.manifest
    limits = Limits(max_frame_bytes=_frame_limit(trainer))
    ssl_ctx = _ssl_context(opts)
    # Build Hello before connecting: a field the wire refuses is this device's own configuration
    # error, fatal here, never a network failure to retry.
    hello = Hello(client_id=opts.client_id, token=opts.token, layout_hash=m.layout_hash, split=m.split,
                  top=trainer.top_blocks if isinstance(trainer, UTrainer) else -1,
                  backend=trainer.backend_name, encodings=opts.encodings, profile=opts.profile)
    failures = 0
    while True:
        welcomed_at = None
        try:
            async with connect(opts.server, compression=None, max_size=limits.max_frame_bytes, ssl=ssl_ctx,
                               open_timeout=opts.open_timeout, ping_interval=20, ping_timeout=60) as ws:
                link = _Link(ws, Connection(Role.CLIENT, limits), report)
                await link.send(hello)
                welcome = await link.recv()
                if not isinstance(welcome, Welcome):
                    raise OrderError(f"expected Welcome, got {type(welcome).__name__}")
                link.encoding = welcome.encoding
                welcomed_at = time.monotonic()
                await _resend_metrics(link, welcome)
                log.info("connected to %s as %s (split %d, %s, %s)", opts.server, opts.client_id, m.split,
                         trainer.backend_name, welcome.encoding)
                reason = await _serve_rounds(link, trainer, opts)
                report.reason = reason
                return report
        except AuthError:
            raise
        except (OSError, ConnectionClosed, InvalidHandshake, asyncio.TimeoutError, ProtocolError) as e:
            if isinstance(e, InvalidURI):
                raise ConfigError(f"bad server URL {opts.server!r}: {e}") from None
            if stop is not None and stop.is_set():
                log.info("connection to %s closed (%s); stopping as asked", opts.server, _why(e))
                return report
            if welcomed_at is not None and time.monotonic() - welcomed_at >= opts.healthy_s:
                failures = 0
            failures += 1
            report.reconnects += 1
            if opts.max_retries and failures > opts.max_retries:
                raise FlexSFLError(f"gave up on {opts.server} after {failures - 1} reconnects in a row: {_why(e)}") from None
            delay = min(opts.backoff_max, opts.backoff_initial * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)
            log.warning("connection to %s lost (%s); retrying in %.1f s", opts.server, _why(e), delay)
            await asyncio.sleep(delay)


async def _resend_metrics(link: _Link, welcome: Welcome) -> None:
    """After a reconnect: send again the Metrics the last connection may have lost, if the server is still
    in their round (it then starts no other round before it reads them); else keep them for after the next
    round's own Metrics (:func:`_serve_rounds`: in that order the server's wait for the new ones is not
    answered by the old)."""
    m = link.report.unconfirmed
    if m is None or welcome.info.get("round", m.round_id) != m.round_id:
        return
    log.info("sending round %d's metrics again (the connection that carried them was lost)", m.round_id)
    await link.send_metrics(m)


def _ssl_context(opts: ClientOptions) -> ssl.SSLContext | None:
    """TLS for wss:// (``ca_file``: a private CA); None for ws://, with a warning off loopback."""
    host = urllib.parse.urlsplit(opts.server).hostname or ""
    if opts.server.startswith("ws://"):
        if not _is_loopback(host):
            log.warning("%s is plain ws:// to a non-loopback host: the token and the activations travel in clear; "
                        "serve with --tls-cert/--tls-key and use wss://", opts.server)
        return None
    try:
        return ssl.create_default_context(cafile=opts.ca_file)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"--ca-file {opts.ca_file}: cannot load the CA certificates ({e}); give a PEM file") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _why(e: BaseException) -> str:
    return str(e) or type(e).__name__


def _frame_limit(trainer: Trainer) -> int:
    m = trainer.bundle.manifest
    z = m.max_batch * m.max_seq * m.model.hidden_size * 4
    params = sum(int(np.prod(p.shape)) * 4 for p in m.trainable_parameters)
    return int(1.1 * max(z, params)) + (8 << 20)  # + room for a whole-model upload (baselines)


async def _serve_rounds(link: _Link, trainer: Trainer, opts: ClientOptions) -> str:
    """Answer the server until Bye. Returns the Bye's reason."""
    while True:
        msg = await link.recv()
        if link.carries_unconfirmed:  # the server read past our last Metrics on the connection that carried them
            link.report.unconfirmed, link.carries_unconfirmed = None, False
        if isinstance(msg, Bye):
            return msg.reason
        if not isinstance(msg, RoundConfig):
            raise OrderError(f"expected RoundConfig between rounds, got {type(msg).__name__}")
        full = msg.mode is RoundMode.FULL
        if full != trainer.whole_model:
            raise ConfigError(
                f"the server runs a {'whole-model' if full else 'split'} strategy but this client was started for "
                f"{'split' if full else 'whole-model'} training; restart it {'with' if full else 'without'} --full-model"
            )
        adapters = None
        if msg.adapters:
            a = await link.recv()
            if not isinstance(a, Adapters):
                raise OrderError(f"expected Adapters after RoundConfig, got {type(a).__name__}")
            adapters = dict(a.tensors)
        metrics = await _train_round(link, trainer, msg, adapters)
        if opts.evaluate and msg.evaluate and trainer.test_set:  # the server says which rounds are scored
            if full:  # the whole model on this device: off the event loop, which must answer the server's pings
                metrics.update(_eval_metrics(trainer.task, await asyncio.to_thread(trainer.evaluate)))
            else:
                metrics.update(await _evaluate(link, trainer, msg.round_id))
        metrics.update(bytes_sent=link.report.bytes_sent, bytes_received=link.report.bytes_received)
        stale = link.report.unconfirmed
        await link.send_metrics(Metrics(round_id=msg.round_id, metrics=metrics))
        if stale is not None:  # an earlier round's, lost with a connection: after this round's, never before it
            await link.send(stale)
        link.report.rounds.append({"round": msg.round_id, **metrics})
        log.info("round %d: loss %.4f%s%s", msg.round_id, metrics["loss"],
                 f", personal acc {metrics['personal_acc']:.3f}" if "personal_acc" in metrics else "",
                 f", personal perplexity {metrics['personal_ppl']:.2f}" if metrics.get("personal_ppl") else "")


async def _train_round(link: _Link, trainer: Trainer, cfg: RoundConfig, adapters) -> dict[str, Any]:
    settings = RoundSettings(round_id=cfg.round_id, local_steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr,
                             optimizer=cfg.optimizer, align_lambda=cfg.align_lambda,
                             personal=cfg.personal, align_top=cfg.align_top, local_rule=cfg.local_rule, head_steps=cfg.head_steps,
                             prox_mu=cfg.prox_mu, alignment=cfg.alignment)
    trainer.begin_round(settings, adapters)
    wait = 0.0
    t_round = time.perf_counter()
    if trainer.whole_model:  # whole model on the device: no steps over the wire
        await asyncio.to_thread(trainer.train_local)
    for step_id in range(0 if trainer.whole_model else cfg.local_steps):
        step = trainer.forward()
        # Z' (alignment) in a thread that starts once _exchange has encoded and written Z: off the critical path.
        ref = asyncio.ensure_future(asyncio.to_thread(trainer.align_reference)) if getattr(trainer, "needs_reference", False) else None
        try:
            g, waited = await _exchange(link, trainer, cfg.round_id, step_id, step)
        finally:
            if ref is not None:
                await ref
        wait += waited
        if step.z_ref is not None:  # logit_kl: the term is in g; count what the server says it added
            trainer.server_alignment(g.align_loss, g.align_ratio, g.align_gap)
        trainer.backward(np.asarray(g.g, dtype=np.float32), g.loss)
    params, n = trainer.upload()
    await link.send(Upload(round_id=cfg.round_id, num_samples=n, tensors=params))
    end = await link.recv()
    if not isinstance(end, RoundEnd):
        raise OrderError(f"expected RoundEnd, got {type(end).__name__}")
    await asyncio.to_thread(trainer.end_round)  # it may write the device's state to disk
    metrics = trainer.stats.as_metrics()
    metrics.update(roundtrip_ms=1e3 * wait / max(cfg.local_steps, 1), round_s=time.perf_counter() - t_round)
    return metrics


async def _exchange(link: _Link, trainer: Trainer, round_id: int, step_id: int, step: Step) -> tuple[Gradients, float]:
    """One train step's legs on the wire: the server's Gradients, and the seconds spent waiting for
    the server (a U-shaped step's top runs here in between and is not counted)."""
    t0 = time.perf_counter()
    u = isinstance(trainer, UTrainer)
    await link.send(Activations(round_id=round_id, step_id=step_id, mode="train", z=step.z,
                                attention_mask=step.attention_mask, labels=step.labels,
                                z_ref=trainer.pending_z_ref if u else step.z_ref, encoding=link.encoding))
    top_s = 0.0
    if u:  # step.labels is None: Z (+ Z') up, H (+ H') down, dL/dH (+ loss) up
        h = await _expect(link, MiddleOutput)
        t_top = time.perf_counter()
        grad_h, loss = trainer.top_step(np.asarray(h.h, dtype=np.float32),
                                        None if h.h_ref is None else np.asarray(h.h_ref, dtype=np.float32))
        top_s = time.perf_counter() - t_top
        await link.send(TopGradients(round_id=round_id, step_id=step_id, loss=loss, grad_h=grad_h, encoding=link.encoding))
    g = await _expect(link, Gradients)
    return g, time.perf_counter() - t0 - top_s


async def _expect(link: _Link, kind: type):
    msg = await link.recv()
    if not isinstance(msg, kind):
        raise OrderError(f"expected {kind.__name__}, got {type(msg).__name__}")
    return msg


def _eval_metrics(task: str, score: Score) -> dict[str, float]:
    """A round's evaluation as Metrics: accuracy (a causal LM: of its next tokens) and, for a causal LM, the
    personal model's perplexity on this device's own held-out text."""
    out = {"personal_acc": score.correct / max(score.counted, 1), "eval_examples": score.counted}
    if task == "causal_lm" and score.counted:
        out["personal_ppl"] = perplexity(score.nll, score.counted)
    return out


async def _evaluate(link: _Link, trainer: Trainer, round_id: int) -> dict[str, float]:
    """Personalized accuracy: θ_k's head + the global tail (U-shaped: the global middle and this
    device's own top, scored here; no labels go out) on the local test split."""
    correct = total = 0
    nll = 0.0
    sent, received = link.report.bytes_sent, link.report.bytes_received
    u = isinstance(trainer, UTrainer)
    for i, step in enumerate(trainer.eval_batches()):
        await link.send(Activations(round_id=round_id, step_id=i, mode="eval", z=step.z, attention_mask=step.attention_mask,
                                    labels=None if u else step.labels, encoding=link.encoding))
        if u:
            s = trainer.score_top(np.asarray((await _expect(link, MiddleOutput)).h), step)
        else:
            s = HeadTrainer.score(trainer.task, np.asarray((await _expect(link, Predictions)).logits), step.labels)
        correct, total, nll = correct + s.correct, total + s.counted, nll + s.nll
    # Counted apart from training traffic, so strategies that score on the server pay no hidden bytes.
    return {**_eval_metrics(trainer.task, Score(correct, total, nll)),
            "eval_bytes_sent": link.report.bytes_sent - sent, "eval_bytes_received": link.report.bytes_received - received}
