"""etcd as the arbiter: ``--arbiter etcd://HOST:PORT[,HOST:PORT...]/PREFIX[?ttl=S]``.

The right to serve alone is the key ``PREFIX/GROUP/holder``, whose value is the node that
holds it, attached to an etcd lease of that node's (TTL ``ttl`` seconds, 2 by default;
etcd may raise it to its own minimum).  The key's revision is the epoch: etcd's revisions
only grow, cluster-wide, so the client endpoint's rule (a takeover only with an epoch above
every one accepted before) holds as with ``emu colo arbiter``.

* ``acquire``: one transaction: if the key does not exist, put it under this node's lease.
  Otherwise it is this node's (a renewal; ``bump`` puts it again, so a new revision, while
  it is still this lease's), or another node's: refused, with how long its lease has left.
* The lease is kept alive by a thread of its own (every TTL/3), from its grant on, so that
  the run loop never waits on etcd, and a lease granted at a refused try (a secondary that
  waits for a dead primary's lease to end) is still alive when a later try puts the key.
  Each keepalive that etcd answers moves the lease's end, as this side sees it, to the
  moment the request was sent plus the TTL: never later than etcd's own.  ``renew`` only
  reads that: past the end, or once etcd says the lease is gone, the lease is lost and
  this side must stop serving.  So a side cut off from etcd keeps serving only while its
  lease is valid, and a side without the lease never serves alone.
* ``close`` revokes the lease (the key goes with it): a side that stops cleanly hands over
  at once; one that dies hands over when its lease expires.

The client is ``etcd3gw``, over etcd's HTTP/JSON gateway: a maintained, pure-Python
client (no gRPC wheels to build), which the run loop reaches only in ``acquire``.
Each request goes to the endpoints in turn until one answers.
"""

import threading
import time
import urllib.parse
from dataclasses import dataclass

from emu.errors import ConfigError

from .arbiter import ArbiterError, LeaseLost, LeaseRefused

DEFAULT_TTL_S = 2
REQUEST_TIMEOUT_S = 0.5


@dataclass(frozen=True)
class EtcdAddress:
    endpoints: tuple   # ((host, port), ...)
    prefix: str
    ttl_s: int = DEFAULT_TTL_S

    def __str__(self):
        hosts = ",".join(f"{h}:{p}" for h, p in self.endpoints)
        return f"etcd://{hosts}{self.prefix}"


def parse_etcd_url(text):
    """``etcd://HOST:PORT[,HOST:PORT...]/PREFIX[?ttl=S]`` -> EtcdAddress (ConfigError naming what is wrong)."""
    expected = "expected etcd://HOST:PORT[,HOST:PORT...]/PREFIX[?ttl=SECONDS]"
    parts = urllib.parse.urlsplit(text)
    if parts.scheme != "etcd" or not parts.netloc:
        raise ConfigError(f"--arbiter {text!r}: {expected}")
    endpoints = []
    for hostport in parts.netloc.split(","):
        host, sep, port = hostport.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"--arbiter {text!r}: endpoint {hostport!r} is not HOST:PORT ({expected})")
        endpoints.append((host, int(port)))
    prefix = parts.path.rstrip("/")
    if not prefix:
        raise ConfigError(f"--arbiter {text!r}: no key PREFIX ({expected})")
    ttl = DEFAULT_TTL_S
    for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if name != "ttl":
            raise ConfigError(f"--arbiter {text!r}: unknown parameter {name!r} ({expected})")
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(f"--arbiter {text!r}: ttl={value!r} is not a whole number of seconds >= 1")
        ttl = int(value)
    return EtcdAddress(tuple(endpoints), prefix, ttl)


class EtcdArbiterClient:
    """A node's lease for one group, in etcd (the interface of :class:`colo.arbiter.ArbiterClient`)."""

    def __init__(self, address, group, node, timeout=REQUEST_TIMEOUT_S, clock=time.monotonic):
        import etcd3gw

        self.address = address
        self.group, self.node = group, node
        self.key = f"{address.prefix}/{group}/holder"
        self.timeout = timeout
        self.clock = clock
        self._clients = [etcd3gw.client(host=h, port=p, timeout=timeout) for h, p in address.endpoints]
        self._current = 0
        self.epoch = None
        self.lease_id = None
        self.ttl_s = None
        self._lock = threading.Lock()
        self._valid_until = 0.0       # this side's view of the lease's end (monotonic)
        self._lost = None             # why the lease is gone, once it is
        self._stop = threading.Event()
        self._keeper = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ the interface
    def acquire(self, bump=False):
        """Take the right to serve (or renew it, or with ``bump`` re-take it under a new
        epoch); returns the epoch.  LeaseRefused if another node holds it; ArbiterError if
        no endpoint answers."""
        if self.lease_id is None or not self._valid():
            self._grant()
        key, value = _b64(self.key), _b64(self.node)
        put = {"request_put": {"key": key, "value": value, "lease": str(self.lease_id)}}
        get = {"request_range": {"key": key}}
        reply = self._call("take the lease", "transaction", {
            "compare": [{"key": key, "result": "EQUAL", "target": "CREATE", "create_revision": "0"}],
            "success": [put, get], "failure": [get]})
        kv = _range_kv(reply, 1 if reply.get("succeeded") else 0)
        if not reply.get("succeeded"):
            if kv is None:  # deleted between the compare and the range: try again
                return self.acquire(bump)
            holder = _unb64(kv.get("value", ""))
            if holder != self.node or str(kv.get("lease", "0")) != str(self.lease_id):
                left = self._lease_left_ms(kv.get("lease"))
                self.epoch = None
                raise LeaseRefused(f"{self._where()}: group {self.group}: {self.node} refused: lease held by "
                                   f"{holder} (epoch {kv.get('mod_revision')}, expires in {left} ms)",
                                   holder, int(kv.get("mod_revision", 0)), left)
            if bump:
                reply = self._call("take a new epoch", "transaction", {
                    "compare": [{"key": key, "result": "EQUAL", "target": "MOD",
                                 "mod_revision": str(kv["mod_revision"])}],
                    "success": [put, get], "failure": [get]})
                if not reply.get("succeeded"):
                    return self.acquire(bump)
                kv = _range_kv(reply, 1)
        self.epoch = int(kv["mod_revision"])
        return self.epoch

    def renew(self):
        """Whether the lease still holds, as the keepalive thread last saw it: LeaseLost if
        not (then ``epoch`` is None and this side must not serve).  Never waits on etcd."""
        if self.epoch is None:
            raise LeaseLost(f"{self._where()}: group {self.group}: {self.node} holds no lease")
        with self._lock:
            lost, until = self._lost, self._valid_until
        now = self.clock()
        if lost is None and now >= until:
            lost = f"the lease ran out {1e3 * (now - until):.0f} ms ago and etcd did not renew it"
        if lost is not None:
            self.epoch = None
            self._stop.set()  # a lease this side gave up must not be kept alive behind its back
            raise LeaseLost(f"{self._where()}: group {self.group}: {lost}")

    def release(self):
        """Give the right up: the lease is revoked, the key goes with it."""
        self._stop_keeper()
        lease, self.lease_id, self.epoch = self.lease_id, None, None
        if lease is not None:
            self._call("revoke the lease", "post_api", "/kv/lease/revoke", {"ID": str(lease)})

    def status(self):
        """{"holder", "epoch", "expires_in_ms"} of the group."""
        reply = self._call("read the holder", "post_api", "/kv/range", {"key": _b64(self.key)})
        kvs = reply.get("kvs") or []
        if not kvs:
            return {"holder": None, "epoch": None, "expires_in_ms": None}
        kv = kvs[0]
        return {"holder": _unb64(kv.get("value", "")), "epoch": int(kv["mod_revision"]),
                "expires_in_ms": self._lease_left_ms(kv.get("lease"))}

    def close(self):
        """Stop renewing and revoke the lease where etcd can be reached (else it expires)."""
        try:
            self.release()
        except ArbiterError:
            pass
        for client in self._clients:
            client.session.close()

    # ------------------------------------------------------------------ the lease
    def _grant(self):
        self._stop_keeper()
        sent = self.clock()
        reply = self._call("grant a lease", "post_api", "/lease/grant", {"TTL": self.address.ttl_s, "ID": 0})
        try:
            self.lease_id, self.ttl_s = int(reply["ID"]), int(reply["TTL"])
        except (KeyError, TypeError, ValueError):
            raise ArbiterError(f"{self._where()}: grant a lease: unexpected reply {reply!r}") from None
        with self._lock:
            self._valid_until, self._lost = sent + self.ttl_s, None
        self._start_keeper()

    def _valid(self):
        with self._lock:
            return self._lost is None and self.clock() < self._valid_until

    def _start_keeper(self):
        if self._keeper is None or not self._keeper.is_alive():
            self._stop = threading.Event()
            self._keeper = threading.Thread(target=self._keep_alive, args=(self.lease_id, self._stop),
                                            name="etcd-lease", daemon=True)
            self._keeper.start()

    def _stop_keeper(self):
        self._stop.set()
        if self._keeper is not None and self._keeper is not threading.current_thread():
            self._keeper.join(self.timeout * len(self._clients) + 1)
        self._keeper = None

    def _keep_alive(self, lease_id, stop):
        period = max(self.ttl_s / 3, 0.1)
        while not stop.wait(period):
            try:
                if not self.keep_alive_once(lease_id):
                    return
            except ArbiterError:
                continue  # renew() decides from the lease's end whether it still holds

    def keep_alive_once(self, lease_id=None):
        """One keepalive of the lease (this node's by default): moves its end as this side
        sees it; False once etcd says it is gone.  ArbiterError if no endpoint answers."""
        lease_id = self.lease_id if lease_id is None else lease_id
        sent = self.clock()
        reply = self._call("renew the lease", "post_api", "/lease/keepalive", {"ID": str(lease_id)})
        ttl = int((reply.get("result") or {}).get("TTL", -1))
        with self._lock:
            if ttl <= 0:
                self._lost = f"etcd says lease {lease_id:x} is gone (expired or revoked)"
                return False
            self._valid_until = max(self._valid_until, sent + ttl)
        return True

    def _lease_left_ms(self, lease):
        if not lease or str(lease) == "0":
            return None
        try:
            reply = self._call("read a lease", "post_api", "/kv/lease/timetolive", {"ID": str(lease)})
            return max(int(reply.get("TTL", -1)), 0) * 1000
        except ArbiterError:
            return None

    # ------------------------------------------------------------------ plumbing
    def _where(self):
        return f"arbiter {self.address}"

    def _call(self, what, method, *args):
        """The request to each endpoint in turn, from the last that answered, until one does."""
        from etcd3gw import exceptions

        errors = []
        for i in range(len(self._clients)):
            index = (self._current + i) % len(self._clients)
            client = self._clients[index]
            try:
                if method == "transaction":
                    reply = client.transaction(args[0])
                else:
                    path, body = args
                    reply = client.post(client.get_url(path), json=body)
                self._current = index
                return reply
            except exceptions.Etcd3Exception as e:
                host, port = self.address.endpoints[index]
                errors.append(f"{host}:{port}: {type(e).__name__}: {str(e)[:200] or 'no answer'}")
        raise ArbiterError(f"{self._where()}: cannot {what}: {'; '.join(errors)}")


def _b64(text):
    import base64

    return base64.b64encode(text.encode()).decode()


def _unb64(text):
    import base64

    return base64.b64decode(text).decode("utf-8", "replace")


def _range_kv(reply, index):
    """The key-value of the range response at ``index`` of a transaction's responses (or None)."""
    responses = reply.get("responses") or []
    if index >= len(responses):
        return None
    kvs = (responses[index].get("response_range") or {}).get("kvs") or []
    return kvs[0] if kvs else None

