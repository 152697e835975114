"""One small client for a running TorchServe: its addresses and keys from the run folder, typed calls, one error mapping.

Example:
    run = RunDir(Path("run/default"))
    management = Management.from_run(run)
    print(management.register("net.mar", workers=2, batch_size=8))
    reply = Inference.from_run(run).predict("net", b'{"inputs": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]}')

Every failure is a :class:`~serveready.handlers.errors.ServereadyError` whose message says what to do:
a :class:`ScriptError` for what the tools refuse, a :class:`ServerError` (with the HTTP ``status``)
for what the server answered, an :class:`ArchiveError` for an archive that fails its checks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from serveready.handlers.archive import REGISTER_KEY, Archive
from serveready.handlers.config import DeviceType
from serveready.handlers.errors import NotFound, ScriptError, ServerError

from .runinfo import RunDir, TokenKind

__all__ = ["Inference", "Management", "NotFound", "Registration", "Rollout", "ScriptError", "ServerError", "Workers"]


@dataclass(frozen=True)
class Registration:
    """A model whose workers are READY."""

    name: str
    archive: str
    workers: int
    device: str
    #: the worker's own line on what computes where, e.g. an int8 model on a GPU worker's CPU
    runs_with: str = ""
    #: batching that TorchServe cannot keep its promises with (see :func:`batching_note`)
    note: str = ""

    @property
    def ready(self) -> str:
        """Its workers and what they say they run with, as ``ts-manage`` prints them."""
        said = f"; it runs with {self.runs_with}" if self.runs_with else ""
        return f"{self.workers} {self.device} worker(s) READY{said}"

    @property
    def note_line(self) -> str:
        return f"\nnote: {self.note}" if self.note else ""

    def __str__(self) -> str:
        return f"registered {self.name} from {self.archive}: {self.ready}{self.note_line}"


#: seconds an old version's workers get to finish the batches they hold before it is unregistered
DRAIN_SECONDS = 2.0
#: what stopping workers under traffic costs, said whenever ``scale`` stops some
SCALE_DOWN_NOTE = ("TorchServe 0.12 stops the extra workers at once, mid-batch: under traffic, a request one of them held gets "
                   "\"Worker died.\" (500) or no answer at all (docs/reliability.md); clients need a timeout and a retry, "
                   "or scale down when traffic is low")


@dataclass(frozen=True)
class Workers:
    """Worker settings for a registration; None takes the archive's own (its tuned ``serve:``)."""

    workers: int | None = None
    batch_size: int | None = None
    max_batch_delay: int | None = None
    response_timeout: int | None = None


@dataclass(frozen=True)
class Rollout:
    """A new version that took over a model's traffic."""

    registration: Registration
    version: str
    previous: str
    #: the old versions unregistered after the switch (none when they were kept)
    removed: list[str]

    def __str__(self) -> str:
        r = self.registration
        kept = (f"; unregistered {', '.join(self.removed)}" if self.removed
                else f"; {self.previous} still registered (back: ts-manage set-default {r.name} {self.previous})")
        return f"rolled out {r.name} {self.version} from {r.archive}: {r.ready}; default now {self.version} (was {self.previous}){kept}{r.note_line}"


def _model_path(name: str, version: str | None = None) -> str:
    """The management API's path of a model, or of one of its versions."""
    return f"/models/{name}" + (f"/{version}" if version else "")


def batching_note(batch_size: int, max_batch_delay: int) -> str:
    """Why waiting to fill batches is a risk with TorchServe 0.12, or "" when it does not wait."""
    if batch_size <= 1 or max_batch_delay <= 0:
        return ""
    return (f"batchSize {batch_size} with maxBatchDelay {max_batch_delay} ms: when a worker dies, TorchServe 0.12 never answers "
            "the requests its worker was holding while it waited to fill a batch (they hang); maxBatchDelay 0 batches only "
            "what is queued and loses none (docs/reliability.md)")


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


#: What TorchServe answers (HTTP 400) to a missing, wrong or expired key.
REFUSED_KEY = "Token Authorization failed"


def key_refused(reply: requests.Response) -> bool:
    return reply.status_code == 400 and REFUSED_KEY in reply.text


def refresh_key(run: RunDir, kind: TokenKind) -> str | None:
    """A new ``kind`` key from TorchServe's token API (the API key does not expire); TorchServe
    writes it to the run folder's key_file.json, where it is read back.

    Raises:
        ScriptError: the API key was refused too (the key file is not this server's), or no server answers.
    """
    api_key = run.token(TokenKind.API)
    url = run.management_url.rstrip("/")
    try:
        reply = requests.post(f"{url}/token", params={"type": kind.value}, headers=_headers(api_key), timeout=30)
    except requests.RequestException:
        raise ScriptError(f"cannot reach TorchServe's management API at {url} to renew the {kind.value} key: is the server running? (ts-server info)") from None
    if not reply.ok:
        raise ScriptError(f"the server at {url} refused the {kind.value} key and its token API refused the API key in {run.key_file} "
                          f"(HTTP {reply.status_code}): is {run.path} the run folder of the server on that port? Restart it with ts-server start")
    return run.token(kind)


def fresh_key(run: RunDir, kind: TokenKind) -> str | None:
    """The run folder's ``kind`` key, renewed first if the server refuses it (for printed curl lines)."""
    key = run.token(kind)
    url = run.inference_url if kind is TokenKind.INFERENCE else run.management_url
    probe = "/ping" if kind is TokenKind.INFERENCE else "/models"
    try:
        reply = requests.get(f"{url.rstrip('/')}{probe}", headers=_headers(key), timeout=10)
    except requests.RequestException:
        return key
    return refresh_key(run, kind) if key_refused(reply) else key


def _body(reply: requests.Response) -> Any:
    try:
        return reply.json()
    except ValueError:
        return {}


@dataclass
class Management:
    """TorchServe's management API: register, scale, describe, unregister.

    A key refused by the server (expired: keys live ``token_expiration_min``) is renewed once
    through the token API when the run folder is known, and the call repeated.
    """

    url: str
    token: str | None
    run: RunDir | None = None
    timeout: float = 60.0
    #: renew a refused key through the run folder's token API (keys read from its key file)
    renew: bool = True

    @classmethod
    def from_run(cls, run: RunDir, url: str | None = None, token: str | None = None) -> Management:
        """The management API of the server started from ``run`` (``url``/``token`` override what its files say)."""
        if token is not None:  # the caller's own key: refused is refused, never swapped for the key file's
            return cls((url or run.management_url).rstrip("/"), token, run, renew=False)
        return cls((url or run.management_url).rstrip("/"), run.token(TokenKind.MANAGEMENT), run)

    def call(self, method: str, path: str, **params: Any) -> Any:
        """One API call; HTTP and connection errors become one-line ScriptErrors."""
        query = {k: v for k, v in params.items() if v is not None}
        reply = self._send(method, path, query)
        if key_refused(reply) and self.run is not None and self.renew:
            self.token = refresh_key(self.run, TokenKind.MANAGEMENT)
            reply = self._send(method, path, query)
        body = _body(reply)
        if reply.ok:
            return body
        message = body.get("message", reply.text.strip()) if isinstance(body, dict) else reply.text.strip()
        status = reply.status_code
        if key_refused(reply):
            raise ServerError(f"the management key was refused by {self.url} (expired, or another server's; keys read from the run folder "
                              f"are renewed, a key given with --token is not): {message}", status)
        if status == 404:
            raise NotFound(f"{method} {path} failed with HTTP 404: {message}")
        if status == 405:
            raise ServerError(f"{method} {path} is not allowed by the server: its model API is off (enable_model_api=false in its "
                              "config.properties); a server started with ts-server start has it on", status)
        raise ServerError(f"{method} {path} failed with HTTP {status}: {message}", status)

    def _send(self, method: str, path: str, query: dict[str, Any]) -> requests.Response:
        try:
            return requests.request(method, f"{self.url}{path}", params=query, headers=_headers(self.token), timeout=self.timeout)
        except requests.ConnectionError:
            raise ScriptError(f"cannot reach TorchServe's management API at {self.url}: is the server running? (ts-server start)") from None
        except requests.Timeout:
            raise ScriptError(f"TorchServe's management API at {self.url} did not answer within {self.timeout:.0f}s") from None

    def models(self) -> Any:
        return self.call("GET", "/models")

    def describe(self, name: str, version: str | None = None) -> list[dict[str, Any]]:
        """The model's default version (or ``version``), as TorchServe describes it."""
        found = self.call("GET", _model_path(name, version))
        return found if isinstance(found, list) else [found]

    def unregister(self, name: str, version: str | None = None, attempts: int = 5) -> str:
        """Unregister; retried when TorchServe 0.12 trips over its own state (HTTP 500: a
        ConcurrentModificationException or a NullPointerException on a job, seen when a model is
        removed right after heavy traffic)."""
        path = _model_path(name, version)
        for attempt in range(attempts):
            try:
                return str(self.call("DELETE", path).get("status", f"unregistered {name}"))
            except NotFound:
                if attempt == 0:
                    raise
                return f"unregistered {name}"  # an earlier attempt did it after all
            except ServerError as err:
                if err.status != 500 or attempt == attempts - 1:
                    raise
                time.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")

    def set_default(self, name: str, version: str) -> str:
        return str(self.call("PUT", f"/models/{name}/{version}/set-default").get("status", ""))

    def wait_ready(self, name: str, workers: int, timeout: float, version: str | None = None) -> list[dict[str, Any]]:
        """Poll describe until ``workers`` workers are READY (/ping says Healthy long before that)."""
        deadline = time.monotonic() + timeout
        while True:
            ready = [w for v in self.describe(name, version) for w in v.get("workers", []) if w.get("status") == "READY"]
            if len(ready) >= workers:
                return ready
            if time.monotonic() > deadline:
                raise ScriptError(f"model {name!r}: {len(ready)} of {workers} workers READY after {timeout:.0f}s; see the server's model_log.log")
            time.sleep(0.5)

    def scale(self, name: str, minimum: int, maximum: int | None = None, timeout: float = 120.0) -> str:
        """Set the default version's worker range and wait for ``minimum`` READY workers."""
        maximum = minimum if maximum is None else maximum
        before = len(self.describe(name)[0].get("workers") or [])
        self.call("PUT", f"/models/{name}", min_worker=minimum, max_worker=maximum, synchronous="true")
        ready = self.wait_ready(name, minimum, timeout)
        note = f"\nnote: {SCALE_DOWN_NOTE}" if maximum < before else ""
        return f"scaled {name}: {len(ready)} worker(s) READY (min {minimum}, max {maximum}){note}"

    def register(
        self,
        archive: str | Path,
        name: str | None = None,
        workers: int | None = None,
        batch_size: int | None = None,
        max_batch_delay: int | None = None,
        response_timeout: int | None = None,
        device: DeviceType | None = None,
        timeout: float = 120.0,
        public_key: Path | None = None,
    ) -> Registration:
        """Register an archive from the server's model store and wait until ``workers`` workers are READY.

        ``public_key``: refuse the archive unless its ``.sig`` verifies with that key.
        ``workers``, ``batch_size``, ``max_batch_delay`` and ``response_timeout`` default to the
        archive's model-config.yaml (its ``serve:`` section, as tuned).

        A device other than the archive's own gets a copy of the archive that says it
        (TorchServe's register call has no device parameter). Workers that cannot start
        are unregistered again (TorchServe would restart them forever) and the error
        quotes their reason from the server's model log.

        Raises:
            ScriptError: no GPU for GPU workers, an archive outside the store, a name taken, workers not READY.
        """
        run = self._run()
        path, config = self._admitted(run, archive, device, public_key)
        name = name or path.name.split(".")[0]
        try:
            self.call("GET", f"/models/{name}")
        except NotFound:
            pass
        else:
            raise ScriptError(f"model {name!r} is already registered: ts-manage unregister {name} first, give another --name, "
                              f"or replace it without downtime: ts-manage rollout {name} {path.name}")
        return self._serve(run, path, config, name, None, Workers(workers, batch_size, max_batch_delay, response_timeout), timeout)

    def rollout(
        self,
        name: str,
        archive: str | Path,
        workers: Workers | None = None,
        device: DeviceType | None = None,
        timeout: float = 120.0,
        public_key: Path | None = None,
        keep_old: bool = False,
        drain: float = DRAIN_SECONDS,
    ) -> Rollout:
        """Replace the model ``name`` by ``archive`` (a new version of it) without a moment of downtime.

        The new version starts beside the old ones; only when its workers are READY (each ran
        the archive's sample at initialize) does it become the default version, and only then
        are the old versions unregistered (``keep_old``: kept, for ``set-default`` back), once
        their queues are empty and ``drain`` more seconds have passed: TorchServe 0.12 never
        answers the requests a worker holds when it is stopped. New version that cannot start:
        removed again, the old one serves on, the error says why.

        Raises:
            ScriptError: ``name`` not registered, the archive's version already registered,
            or anything :meth:`register` refuses.
        """
        run = self._run()
        try:
            before = self.call("GET", f"/models/{name}/all")
        except NotFound:
            raise ScriptError(f"model {name!r} is not registered, so there is nothing to roll out over: ts-manage register {archive} --name {name}") from None
        old = [str(v.get("modelVersion")) for v in before]
        previous = next((str(v.get("modelVersion")) for v in self.describe(name)), old[0])
        path, config = self._admitted(run, archive, device, public_key)
        version = Archive(path).version
        if version in old:
            raise ScriptError(f"{name} version {version} is already registered (registered: {', '.join(old)}): "
                              f"give the new archive another version (the model config's version:) and rebuild it")
        registration = self._serve(run, path, config, name, version, workers or Workers(), timeout)
        self.set_default(name, version)
        if not keep_old:
            self.drain(name, old, drain, timeout)
            for old_version in old:
                self.unregister(name, old_version)
        return Rollout(registration, version, previous, [] if keep_old else old)

    def drain(self, name: str, versions: list[str], grace: float, timeout: float) -> None:
        """Wait until no request is queued for ``versions`` (no longer the default), then ``grace``
        seconds for the batches their workers hold: a worker stopped mid-batch drops its requests
        unanswered (TorchServe 0.12's "Unexpected job in sendError()")."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pending = [int((v.get("jobQueueStatus") or {}).get("pendingRequests") or 0) for version in versions for v in self.describe(name, version)]
            if not any(pending):
                break
            time.sleep(0.1)
        time.sleep(grace)

    def _admitted(self, run: RunDir, archive: str | Path, device: DeviceType | None, public_key: Path | None) -> tuple[Path, dict[str, Any]]:
        """The archive to register (retargeted to ``device``) and its model-config, once it passed every check."""
        if device is DeviceType.GPU and run.gpus == 0:
            raise ScriptError("GPU workers were asked for, but this server has no GPU (number_of_gpu=0); use --device cpu")
        path = archive_in_store(str(archive), run.model_store)
        Archive(path).check(public_key, outcome="not registered")
        config = Archive(path).config
        if device is not None and config.get("deviceType") != device.value:
            path = Archive(path).retarget(device.value).path
        return path, config

    def _serve(self, run: RunDir, path: Path, config: dict[str, Any], name: str, version: str | None, settings: Workers, timeout: float) -> Registration:
        """Register ``path`` as ``name`` (beside its other versions when ``version`` is given) and wait for READY workers."""
        # Settings not given come from the archive: its (tuned) worker count, and the batching
        # TorchServe cannot read from an archive (maxBatchDelay 0), which is passed explicitly.
        wanted = config.get(REGISTER_KEY) or {}
        workers = int(config.get("minWorkers") or 1) if settings.workers is None else settings.workers
        batch_size = wanted.get("batchSize") if settings.batch_size is None else settings.batch_size
        max_batch_delay = wanted.get("maxBatchDelay") if settings.max_batch_delay is None else settings.max_batch_delay
        target = _model_path(name, version)
        since = _log_size(run)
        try:
            self.call("POST", "/models", url=path.name, model_name=name, initial_workers=workers, batch_size=batch_size,
                      max_batch_delay=max_batch_delay, response_timeout=settings.response_timeout, synchronous="true")
            # initial_workers is capped by the archive's maxWorkers: set both explicitly.
            self.call("PUT", target, min_worker=workers, max_worker=workers, synchronous="true")
            ready = self.wait_ready(name, workers, timeout, version)
        except ScriptError as err:
            # The reason is read before the unregister: that deletes the unpacked archive under
            # workers still retrying, whose later failures say only that files vanished.
            reason = load_failure(run, name, since)
            try:
                self.call("DELETE", target)
            except ScriptError:
                pass
            what = f"{name!r}" + (f" version {version}" if version else "")
            raise ScriptError(f"{err.message}; {what} is not registered{reason}") from None
        device_used = "GPU" if any(w.get("gpu") for w in ready) else "CPU"
        batching = self.describe(name, version)[0]
        note = batching_note(int(batching.get("batchSize") or 1), int(batching.get("maxBatchDelay") or 0))
        return Registration(name, path.name, len(ready), device_used, placement(run, name, since), note)

    def _run(self) -> RunDir:
        if self.run is None:
            raise ScriptError("registering needs the server's run folder (its model store and GPU count): pass --run-dir")
        return self.run


#: Answers a prediction may get while a worker dies and is replaced: "Worker died." (TorchServe
#: sends 500, or 413/507 after a SIGKILL) and 503 (no worker free yet).
WORKER_GONE = "Worker died"


def worker_gone(reply: requests.Response) -> bool:
    return reply.status_code == 503 or (reply.status_code in (413, 500, 507) and WORKER_GONE in reply.text)


@dataclass
class Inference:
    """TorchServe's inference API with the current inference key.

    Predictions are idempotent: one that met a dying worker is sent again (``retries`` times,
    after ``backoff`` seconds, doubling), and a refused key is renewed once when the run
    folder is known.
    """

    url: str
    token: str | None
    timeout: float = 60.0
    run: RunDir | None = None
    retries: int = 3
    backoff: float = 0.05

    @classmethod
    def from_run(cls, run: RunDir, timeout: float = 60.0) -> Inference:
        return cls(run.inference_url.rstrip("/"), run.token(TokenKind.INFERENCE), timeout, run)

    def headers(self, content_type: str) -> dict[str, str]:
        """Request headers: the content type and, when token authorization is on, the key."""
        return {"Content-Type": content_type, **_headers(self.token)}

    def post(self, model: str, body: bytes, content_type: str, endpoint: str = "predictions") -> requests.Response:
        """POST ``body`` to ``/<endpoint>/<model>``; a server that cannot be reached or does not answer is a ScriptError."""
        path = f"{endpoint}/{model}"
        reply = self._send(path, body, content_type)
        if key_refused(reply) and self.run is not None:
            self.token = refresh_key(self.run, TokenKind.INFERENCE)
            reply = self._send(path, body, content_type)
        wait = self.backoff
        for _ in range(self.retries):
            if not worker_gone(reply):
                break
            time.sleep(wait)
            wait *= 2
            reply = self._send(path, body, content_type)
        return reply

    def _send(self, path: str, body: bytes, content_type: str) -> requests.Response:
        try:
            return requests.post(f"{self.url}/{path}", data=body, headers=self.headers(content_type), timeout=self.timeout)
        except requests.ConnectionError:
            raise ScriptError(f"cannot reach TorchServe at {self.url}: is the server running? (ts-server start)") from None
        except requests.Timeout:
            raise ScriptError(f"TorchServe at {self.url} did not answer {path} within {self.timeout:g}s (the model's responseTimeout, or a busy server)") from None


def archive_in_store(archive: str, store: Path) -> Path:
    """The archive's path, which must be in the server's model store (``allowed_urls`` admits nothing else)."""
    path = Path(archive)
    candidate = path if path.is_absolute() or path.exists() else store / path
    candidate = candidate.resolve()
    if not candidate.is_file():
        raise ScriptError(f"archive {archive} not found (looked in {store})")
    if candidate.parent != store.resolve():
        raise ScriptError(f"{candidate} is outside the model store {store}: the server only loads archives from there (allowed_urls); copy it in")
    return candidate


def _log_size(run: RunDir) -> int:
    log = run.log_dir / "model_log.log"
    return log.stat().st_size if log.is_file() else 0


def _model_log_says(run: RunDir, marker: str, since: int, wait: float) -> list[str]:
    """What follows ``marker`` on the model log's lines after byte ``since``; waits up to ``wait``
    seconds for one (the log is written asynchronously)."""
    log = run.log_dir / "model_log.log"
    deadline = time.monotonic() + wait
    while True:
        text = ""
        if log.is_file():
            with open(log, "rb") as f:
                f.seek(since)
                text = f.read().decode(errors="replace")
        found = [line.split(marker, 1)[1].strip() for line in text.splitlines() if marker in line]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def load_failure(run: RunDir, name: str, since: int = 0, wait: float = 3.0) -> str:
    """The worker's own reason, from the server's model log (after byte ``since``), when it is readable here.

    The first failure is the one quoted: retries after it may fail for reasons of their own.
    """
    reasons = _model_log_says(run, f"Failed to load model {name}, exception ", since, wait)
    if reasons:
        return f"; the worker said: {reasons[0]}"
    log = run.log_dir / "model_log.log"
    return f"; see {log}" if log.is_file() else ""


def placement(run: RunDir, name: str, since: int = 0, wait: float = 2.0) -> str:
    """What the model's first worker logged about where it computes ("torch float16 on cuda:0"), if readable here."""
    said = _model_log_says(run, f" model {name} runs with ", since, wait)
    return said[0] if said else ""
