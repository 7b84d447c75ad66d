"""A real etcd cluster (Debian's etcd-server) on loopback ports, in a temporary directory.

One node, or three for the quorum tests.  Its heartbeat (50 ms) and election timeout
(500 ms) are short, so that a lease's TTL may be 1 s and a lost quorum shows within a
second.  Each node can be stopped (SIGSTOP: it no longer answers, as a partitioned host)
and let go on (SIGCONT), or killed.
"""

import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request


def etcd_missing():
    """Why this machine cannot run etcd, or None."""
    if shutil.which("etcd") is None:
        return "etcd is not installed (Debian's etcd-server; make setup installs it where apt can)"
    return None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdCluster:
    def __init__(self, tmp_path, nodes=1, namespace=None, hosts=("127.0.0.1",)):
        """``namespace``: run the nodes in that network namespace, serving clients on each of
        ``hosts`` (its addresses), with their peer traffic on its loopback."""
        self.dir = tmp_path / "etcd"
        self.dir.mkdir(exist_ok=True)
        self.namespace, self.hosts = namespace, hosts
        self.client_ports = [_free_port() + 7 * i for i in range(nodes)] if namespace else \
            [_free_port() for _ in range(nodes)]
        peer_ports = [port + 1 for port in self.client_ports] if namespace else [_free_port() for _ in range(nodes)]
        prefix = ["ip", "netns", "exec", namespace] if namespace else []
        initial = ",".join(f"n{i}=http://127.0.0.1:{p}" for i, p in enumerate(peer_ports))
        self.procs = []
        try:
            for i in range(nodes):
                log = open(self.dir / f"n{i}.log", "wb")
                urls = ",".join(f"http://{host}:{self.client_ports[i]}" for host in hosts)
                self.procs.append(subprocess.Popen([
                    *prefix, "etcd", "--name", f"n{i}", "--data-dir", str(self.dir / f"n{i}"),
                    "--listen-client-urls", urls, "--advertise-client-urls", urls,
                    "--listen-peer-urls", f"http://127.0.0.1:{peer_ports[i]}",
                    "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_ports[i]}",
                    "--initial-cluster", initial, "--initial-cluster-state", "new",
                    "--initial-cluster-token", f"emu-{self.dir.parent.name}",
                    "--heartbeat-interval", "50", "--election-timeout", "500", "--logger", "zap",
                    "--log-level", "warn"], stdout=log, stderr=log, stdin=subprocess.DEVNULL))
            for i in range(nodes):
                self.wait_healthy(i)
        except BaseException:
            self.close()
            raise

    def endpoints(self, nodes=None, host=None):
        host = host or self.hosts[0]
        return ",".join(f"{host}:{self.client_ports[i]}" for i in (nodes or range(len(self.procs))))

    def url(self, prefix="/emu-colo", ttl=None, nodes=None, host=None):
        return f"etcd://{self.endpoints(nodes, host)}{prefix}" + (f"?ttl={ttl}" if ttl else "")

    def wait_healthy(self, i, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            if self._healthy(i):
                return
            if self.procs[i].poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"etcd n{i} not healthy: {(self.dir / f'n{i}.log').read_text()[-2000:]}")
            time.sleep(0.1)

    def _healthy(self, i):
        url = f"http://{self.hosts[0]}:{self.client_ports[i]}/health"
        if self.namespace:
            done = subprocess.run(["ip", "netns", "exec", self.namespace, "curl", "-s", "-m", "1", url],
                                  capture_output=True)
            return b'"true"' in done.stdout
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                return b'"true"' in r.read()
        except OSError:
            return False

    def pause(self, i):
        self.procs[i].send_signal(signal.SIGSTOP)

    def resume(self, i):
        self.procs[i].send_signal(signal.SIGCONT)

    def close(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait(10)


class Blackhole:
    """A TCP relay to ``127.0.0.1:target_port`` for many connections, which :meth:`cut`
    turns into a partition: nothing is forwarded any more, new connections are accepted
    and never answered, so every request times out, as across a partitioned network."""

    def __init__(self, target_port):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target_port = target_port
        self.cut_event = threading.Event()
        self.socks = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                a, _ = self.listener.accept()
            except OSError:
                return
            self.socks.append(a)
            if self.cut_event.is_set():
                continue  # held open, never answered
            b = socket.create_connection(("127.0.0.1", self.target_port))
            self.socks.append(b)
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src, dst):
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if self.cut_event.is_set():
                    continue  # swallowed
                dst.sendall(data)
        except OSError:
            pass

    def cut(self):
        self.cut_event.set()

    def close(self):
        self.listener.close()
        for s in self.socks:
            s.close()
