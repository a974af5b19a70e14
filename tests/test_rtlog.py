"""toilcoord.rtlog: Toil's RealtimeLogger API end to end: leaders and
workers, nesting, the environment, signing by default, hosts and addresses."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from toilcoord._tools.rtlog_burst import rtlog_burst
from toilcoord.rtlog import (
    RECEIVED_MARK,
    RealtimeLogger,
    RealtimeLogHandler,
    RealtimeLogServer,
    advertised_host,
    parse_level,
    split_address,
)

import rtlog_support
from conftest import ROOT, child_env, run_in_fork, run_python
from fuzzing import SEED, random_bytes, rng_for, sizes
from rtlog_support import PREFIX, VARIABLES, leader_server, raw_sender, toil_datagram, wait_until

pytestmark = pytest.mark.timeout(60)

# The shared fixtures, in effect in this module (clean_state is autouse).
clean_state, received = rtlog_support.clean_state, rtlog_support.received


# ---------------------------------------------------------------- leader/worker


def test_worker_info_arrives_debug_does_not_and_variables_go(received):
    with RealtimeLogger(level="INFO", host="127.0.0.1"):
        assert split_address(os.environ[PREFIX + "ADDRESS"]) == ("127.0.0.1", leader_server().server_address[1])
        assert os.environ[PREFIX + "LEVEL"] == "INFO"
        result = run_python("""
            from toilcoord.rtlog import RealtimeLogger
            RealtimeLogger.debug("debug record")
            RealtimeLogger.info("info record %d", 1)
            RealtimeLogger.warning("last")
            print(RealtimeLogger._handler.transport)
        """)
        assert result.returncode == 0, result.stderr
        last = received.wait_for("last")  # arrives while the leader runs
    assert received.messages() == ["info record 1", "last"]
    assert result.stdout.strip() == "unix"  # same node: the local socket
    assert (last.name, last.levelno, last.levelname) == ("toil-rt", logging.WARNING, "WARNING")
    assert last.__dict__[RECEIVED_MARK] is True
    for name in VARIABLES:
        assert name not in os.environ


def test_udp_only_leader_serves_workers_over_udp(received):
    with RealtimeLogger(host="127.0.0.1", localSocket=False):
        assert PREFIX + "LOCAL_ADDRESS" not in os.environ
        result = run_python("""
            from toilcoord.rtlog import RealtimeLogger
            RealtimeLogger.info("over udp")
            print(RealtimeLogger._handler.transport)
        """)
        assert result.returncode == 0, result.stderr
        received.wait_for("over udp")
    assert result.stdout.strip() == "udp"


def test_nested_entries_share_one_server_until_the_last_exit(received):
    with RealtimeLogger(host="127.0.0.1"):
        server, thread = leader_server(), RealtimeLogger.serverThread
        address = os.environ[PREFIX + "ADDRESS"]
        with RealtimeLogger(host="127.0.0.1", level="DEBUG"):
            assert RealtimeLogger.loggingServer is server and RealtimeLogger.initialized == 2
        assert RealtimeLogger.initialized == 1 and thread.is_alive()
        assert os.environ[PREFIX + "ADDRESS"] == address
        result = run_python("from toilcoord.rtlog import RealtimeLogger; RealtimeLogger.info('after inner exit')")
        assert result.returncode == 0, result.stderr
        received.wait_for("after inner exit")
    assert RealtimeLogger.initialized == 0
    assert RealtimeLogger.loggingServer is None and RealtimeLogger.serverThread is None
    assert not thread.is_alive()
    assert server.socket.fileno() == -1 and server.local_socket.fileno() == -1
    for name in VARIABLES:
        assert name not in os.environ
    with pytest.raises(RuntimeError):
        RealtimeLogger._stopLeader()


@pytest.mark.parametrize("level", [None, False, ""])
def test_disabled_level_starts_nothing_and_workers_stay_silent(level):
    with RealtimeLogger(level=level):
        assert RealtimeLogger.loggingServer is None and RealtimeLogger.initialized == 1
        assert not any(name in os.environ for name in VARIABLES)
        result = run_python("""
            import logging
            from toilcoord.rtlog import RealtimeLogger
            logger = RealtimeLogger.getLogger()
            RealtimeLogger.error("nowhere to go")
            print(logger.level == logging.CRITICAL, RealtimeLogger._handler)
        """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "None"]


def test_last_exit_restores_an_outer_leaders_variables(monkeypatch):
    monkeypatch.setenv(PREFIX + "ADDRESS", "10.9.8.7:4000")
    monkeypatch.setenv(PREFIX + "LEVEL", "WARNING")
    with RealtimeLogger(host="127.0.0.1"):
        assert os.environ[PREFIX + "ADDRESS"] != "10.9.8.7:4000"
        assert os.environ[PREFIX + "LEVEL"] == "INFO"
    assert os.environ[PREFIX + "ADDRESS"] == "10.9.8.7:4000"
    assert os.environ[PREFIX + "LEVEL"] == "WARNING"
    assert PREFIX + "LOCAL_ADDRESS" not in os.environ


class BatchSystem:
    """Records the names a leader hands to Toil's ``setEnv``."""

    def __init__(self):
        self.names = []

    def setEnv(self, name, value=None):  # noqa: N802 - Toil's name
        self.names.append(name)


def test_batch_system_gets_every_variable(received):
    batch = BatchSystem()
    with RealtimeLogger(batch, host="127.0.0.1", secret="shh"):
        assert batch.names == VARIABLES
        assert os.environ[PREFIX + "SECRET"] == "shh"


def test_worker_adopts_the_leaders_level(received):
    with RealtimeLogger(level="debug", host="127.0.0.1"):
        assert os.environ[PREFIX + "LEVEL"] == "DEBUG"
        result = run_python("""
            from toilcoord.rtlog import RealtimeLogger
            RealtimeLogger.debug("debug now travels")
            print(RealtimeLogger.getLogger().level)
        """)
        assert result.returncode == 0, result.stderr
        received.wait_for("debug now travels")
    assert result.stdout.strip() == str(logging.DEBUG)


def test_leader_process_logs_locally_once(received):
    with RealtimeLogger(host="127.0.0.1"):
        server = leader_server()
        RealtimeLogger.info("from the leader itself")
        RealtimeLogger.debug("below the leader's level")
        assert RealtimeLogger._handler is None
    assert received.messages() == ["from the leader itself"]
    assert RECEIVED_MARK not in received.records[0].__dict__
    assert server.statistics()["received"] == 0  # never went through the socket


def test_forked_child_of_the_leader_is_a_worker(received):
    with RealtimeLogger(host="127.0.0.1"):
        RealtimeLogger.info("parent, local")  # configure the leader's own logger first

        def child_sends():
            RealtimeLogger.info("from the forked child")
            return RealtimeLogger._handler is not None

        assert run_in_fork(child_sends) == 0
        child_record = received.wait_for("from the forked child")
        assert child_record.__dict__[RECEIVED_MARK] is True
        assert leader_server().statistics()["received"] == 1


def test_a_forked_child_leaving_the_inherited_block_stops_nothing(received):
    # Regression (found in review): the child raised "exited more often than
    # entered" when it ran on out of the with block it inherited.
    leader = RealtimeLogger(host="127.0.0.1")
    with leader:

        def child_leaves_then_logs():
            leader.__exit__(None, None, None)  # what running on out of the block does
            RealtimeLogger.info("child, after leaving the block")
            return True

        assert run_in_fork(child_leaves_then_logs) == 0
        received.wait_for("child, after leaving the block")
        assert RealtimeLogger.loggingServer is not None, "the parent's leader still runs"


def test_deferred_style_fallback_pattern(received):
    pattern = """
        import logging, sys
        from toilcoord.rtlog import RealtimeLogger
        logging.basicConfig(stream=sys.stdout, format="local %(levelname)s %(name)s %(message)s")
        module_logger = logging.getLogger("deferred")
        rt = RealtimeLogger.getLogger()
        print("enabled", rt.isEnabledFor(logging.ERROR))
        try:
            raise KeyError("cleanup")
        except KeyError:
            (rt if rt.isEnabledFor(logging.ERROR) else module_logger).exception("deferred function failed")
    """
    alone = run_python(pattern)
    assert alone.returncode == 0, alone.stderr
    assert "enabled False" in alone.stdout and "local ERROR deferred deferred function failed" in alone.stdout
    with RealtimeLogger(host="127.0.0.1"):
        worker = run_python(pattern)
        assert worker.returncode == 0, worker.stderr
        record = received.wait_for("deferred function failed")
    assert "enabled True" in worker.stdout and "local ERROR toil-rt deferred function failed" in worker.stdout
    assert "KeyError: 'cleanup'" in record.exc_text


# --------------------------------------------------------------------- bursts


def test_burst_from_several_processes_is_delivered():
    result = rtlog_burst(procs=4, records=2000)
    assert result["sent"] == 8000
    assert result["fraction"] >= 0.9, result
    assert result["statistics"]["received"] == result["delivered"]
    assert len(result["statistics"]["senders"]) == 4


def test_udp_burst_from_several_processes_is_delivered():
    result = rtlog_burst(procs=4, records=1000, transport="udp")
    assert result["fraction"] >= 0.9, result


def test_levels_addresses_and_arguments_are_checked():
    assert parse_level("info") == logging.INFO and parse_level("OFF") == logging.CRITICAL
    assert parse_level("15") == 15 and parse_level(logging.DEBUG) == logging.DEBUG
    for bad in ("LOUD", True, 1.5):
        with pytest.raises(ValueError):
            parse_level(bad)
    assert split_address("[::1]:5000") == ("::1", 5000) and split_address("h.example:1") == ("h.example", 1)
    for bad in ("nohost", "h:", "h:0", "h:70000", ":80"):
        with pytest.raises(ValueError):
            split_address(bad)
    with pytest.raises(ValueError):
        RealtimeLogger(level="LOUD")
    with pytest.raises(ValueError):
        RealtimeLogger(port=-1)
    with pytest.raises(ValueError):
        RealtimeLogger(host="")
    with pytest.raises(TypeError):
        RealtimeLogger(secret=b"bytes")
    assert RealtimeLogger.initialized == 0


def test_bad_environment_on_a_worker_is_not_fatal():
    result = run_python(
        """
        import logging
        from toilcoord.rtlog import RealtimeLogger
        print(RealtimeLogger.getLogger().level == logging.CRITICAL)
    """,
        env=child_env(**{PREFIX + "ADDRESS": "not an address"}),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True" and "Real-time logging disabled" in result.stderr


def test_binding_and_advertising_need_no_network(received, monkeypatch):
    def no_connect(self, *args):
        raise AssertionError("connected a socket while choosing an address")

    monkeypatch.setattr(socket.socket, "connect", no_connect)
    host = advertised_host()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((host, 0))  # only addresses of this host can be bound
    with RealtimeLogger():
        assert leader_server().server_address[0] == host  # what it advertises, not 0.0.0.0
        assert os.environ[PREFIX + "ADDRESS"].startswith(host + ":")
    monkeypatch.undo()
    with RealtimeLogger(host="localhost"):
        assert leader_server().server_address[0] == "127.0.0.1"
        assert os.environ[PREFIX + "ADDRESS"].startswith("127.0.0.1:")


def test_import_is_light():
    # -S: no site hooks importing things before us.
    result = subprocess.run(
        [sys.executable, "-S", "-c", "import sys, toilcoord; print(' '.join(sys.modules))"],
        env=child_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    loaded = set(result.stdout.split())
    assert "toilcoord.rtlog" in loaded
    assert not loaded & {"json", "hmac", "hashlib", "socket", "socketserver", "struct", "pickle"}, loaded


# ---------------------------------------------------------------- across hosts


def ip(*args):
    return subprocess.run(["ip", *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair: 10.231.0.1 and 10.231.0.2."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    tag = "%d%s" % (os.getpid(), os.urandom(2).hex())
    leader_ns, worker_ns = "rtlogL" + tag, "rtlogW" + tag
    created = []
    try:
        for ns in (leader_ns, worker_ns):
            done = ip("netns", "add", ns)
            if done.returncode:
                pytest.skip("cannot create network namespaces here: " + done.stderr.strip())
            created.append(ns)
        steps = [
            ("link", "add", "rtl", "netns", leader_ns, "type", "veth", "peer", "name", "rtw", "netns", worker_ns),
            ("-n", leader_ns, "addr", "add", "10.231.0.1/24", "dev", "rtl"),
            ("-n", worker_ns, "addr", "add", "10.231.0.2/24", "dev", "rtw"),
            ("-n", leader_ns, "link", "set", "rtl", "up"),
            ("-n", leader_ns, "link", "set", "lo", "up"),
            ("-n", worker_ns, "link", "set", "rtw", "up"),
            ("-n", worker_ns, "link", "set", "lo", "up"),
        ]
        for step in steps:
            done = ip(*step)
            if done.returncode:
                pytest.skip("cannot wire network namespaces here: " + done.stderr.strip())
        yield leader_ns, worker_ns
    finally:
        for ns in created:
            ip("netns", "del", ns)


LEADER_IN_NAMESPACE = """
import logging, os, sys, threading
from toilcoord.rtlog import RealtimeLogger
arrived = threading.Event()
class Wait(logging.Handler):
    def emit(self, record):
        if record.getMessage() == "across hosts":
            print("got", record.getMessage(), record.rt_sender, flush=True)
            arrived.set()
logging.getLogger("toil-rt").addHandler(Wait())
with RealtimeLogger(host=sys.argv[1] or None):
    for name in ("ADDRESS", "LOCAL_ADDRESS", "SECRET"):
        print(os.environ["TOIL_RT_LOGGING_" + name], flush=True)
    arrived.wait(60)
"""


WORKER_IN_NAMESPACE = """
from toilcoord.rtlog import RealtimeLogger
for _ in range(3):
    RealtimeLogger.info("across hosts")
print(RealtimeLogger._handler.transport)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("host", ["", "10.231.0.1"])
def test_worker_on_another_host_reaches_the_leader(two_hosts, children, host):
    leader_ns, worker_ns = two_hosts
    leader = subprocess.Popen(
        ["ip", "netns", "exec", leader_ns, sys.executable, "-c", LEADER_IN_NAMESPACE, host],
        env=child_env(),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    children.started.append(leader)
    address = leader.stdout.readline().strip()
    local_address = leader.stdout.readline().strip()
    secret = leader.stdout.readline().strip()
    assert address.startswith("10.231.0.1:")  # its own choice finds the veth address
    worker = subprocess.run(
        ["ip", "netns", "exec", worker_ns, sys.executable, "-c", WORKER_IN_NAMESPACE],
        env=child_env(
            **{PREFIX + "ADDRESS": address, PREFIX + "LOCAL_ADDRESS": local_address, PREFIX + "SECRET": secret}
        ),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert worker.returncode == 0, worker.stderr
    assert worker.stdout.strip() == "udp"  # the leader's local socket is out of reach
    assert leader.stdout.readline().startswith("got across hosts ")
    assert leader.wait(30) == 0


def test_leader_binds_the_advertised_address_and_nothing_else(received):
    host = advertised_host()
    with RealtimeLogger(secret=False):
        server = leader_server()
        port = server.server_address[1]
        assert server.server_address[0] == host
        assert os.environ[PREFIX + "ADDRESS"] == "%s:%d" % (host, port)
        if host != "127.0.0.1":  # another address of this host reaches nothing
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as elsewhere:
                elsewhere.settimeout(10)
                elsewhere.connect(("127.0.0.1", port))
                elsewhere.send(toil_datagram("via loopback"))
                with pytest.raises(ConnectionRefusedError):
                    elsewhere.recv(1)  # ICMP port unreachable
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as advertised:
            advertised.sendto(toil_datagram("via the advertised address"), (host, port))
            received.wait_for("via the advertised address")
    assert received.messages() == ["via the advertised address"]
    with RealtimeLogger(host="127.0.0.1"):
        assert leader_server().server_address[0] == "127.0.0.1"
    with pytest.raises(OSError, match="198.51.100.7"):  # not an address of this host
        with RealtimeLogger(host="198.51.100.7"):
            pass
    assert RealtimeLogger.initialized == 0 and PREFIX + "ADDRESS" not in os.environ


def test_leader_signs_by_default_and_hands_workers_its_secret(received):
    batch = BatchSystem()
    with RealtimeLogger(batch, "INFO", "127.0.0.1", 0):  # Toil's positional signature
        secret = os.environ[PREFIX + "SECRET"]
        assert re.fullmatch("[0-9a-f]{64}", secret), secret
        assert batch.names == VARIABLES
        server = leader_server()
        sender = raw_sender(server, "unix")  # the worker's transport: one queue, in order
        sender.send(toil_datagram("unsigned"))
        sender.close()
        worker = run_python("from toilcoord.rtlog import RealtimeLogger; RealtimeLogger.info('signed by the worker')")
        assert worker.returncode == 0, worker.stderr
        received.wait_for("signed by the worker")
        stats = server.statistics()
    assert stats["forged"] == 1 and received.messages() == ["signed by the worker"]
    assert PREFIX + "SECRET" not in os.environ
    with RealtimeLogger(host="127.0.0.1"):
        assert os.environ[PREFIX + "SECRET"] != secret  # a new one for every leader


@pytest.mark.parametrize("opt_out", [False, ""])
def test_opting_out_of_the_secret_admits_toil_workers(received, monkeypatch, opt_out):
    monkeypatch.setenv(PREFIX + "SECRET", "an outer leader's secret")
    batch = BatchSystem()
    with RealtimeLogger(batch, host="127.0.0.1", secret=opt_out):
        assert PREFIX + "SECRET" not in os.environ and PREFIX + "SECRET" not in batch.names
        sender = raw_sender(leader_server(), "udp")
        sender.send(toil_datagram("from a Toil worker %s", "unsigned"))
        sender.close()
        received.wait_for("from a Toil worker unsigned")
    assert os.environ[PREFIX + "SECRET"] == "an outer leader's secret"


# A worker of unmodified Toil: its JSONDatagramHandler, unsigned, by UDP to
# the address the leader exported.
TOIL_WORKER = """
import json, logging, logging.handlers, os, sys
class JSONDatagramHandler(logging.handlers.DatagramHandler):
    def makePickle(self, record):
        return json.dumps(record.__dict__).encode("utf-8")
host, port = os.environ["TOIL_RT_LOGGING_ADDRESS"].rsplit(":", 1)
logger = logging.getLogger("toil-rt")
logger.setLevel(logging.INFO)
logger.addHandler(JSONDatagramHandler(host, int(port)))
logger.info("from an unmodified Toil worker %s", sys.argv[1])
"""


def test_the_leaders_environment_can_opt_out_of_signing(received, monkeypatch, caplog):
    monkeypatch.setenv("TOILCOORD_RTLOG_UNSIGNED", "1")
    monkeypatch.setenv(PREFIX + "SECRET", "an outer leader's secret")
    batch = BatchSystem()
    with caplog.at_level(logging.WARNING, logger="toilcoord.rtlog"):
        with RealtimeLogger(batch, "INFO", "127.0.0.1", 0):  # as Toil's leader makes it: secret None
            assert PREFIX + "SECRET" not in os.environ and PREFIX + "SECRET" not in batch.names
            for number in range(3):
                worker = run_python(TOIL_WORKER, str(number))
                assert worker.returncode == 0, worker.stderr
                received.wait_for("from an unmodified Toil worker %d" % number)
            ours = run_python("from toilcoord.rtlog import RealtimeLogger; RealtimeLogger.info('from ours')")
            assert ours.returncode == 0, ours.stderr
            received.wait_for("from ours")
            assert leader_server().statistics()["forged"] == 0
    warnings = [r.getMessage() for r in caplog.records if "TOILCOORD_RTLOG_UNSIGNED" in r.getMessage()]
    assert len(warnings) == 1 and "any process on this node" in warnings[0], warnings
    assert os.environ[PREFIX + "SECRET"] == "an outer leader's secret"


@pytest.mark.parametrize("value", ["0", "", "yes"])
def test_any_other_value_keeps_the_leader_signing(received, monkeypatch, caplog, value):
    monkeypatch.setenv("TOILCOORD_RTLOG_UNSIGNED", value)
    with caplog.at_level(logging.WARNING, logger="toilcoord.rtlog"):
        with RealtimeLogger(host="127.0.0.1"):
            assert re.fullmatch("[0-9a-f]{64}", os.environ[PREFIX + "SECRET"])
            worker = run_python(TOIL_WORKER, "dropped")
            assert worker.returncode == 0, worker.stderr
            wait_until(lambda: leader_server().statistics()["forged"] == 1)
    assert received.messages() == []
    ignored = [r.getMessage() for r in caplog.records if "TOILCOORD_RTLOG_UNSIGNED" in r.getMessage()]
    assert ignored == (
        ["Real-time logging: TOILCOORD_RTLOG_UNSIGNED='yes' ignored (1 or 0 only); signing"] if value == "yes" else []
    )


def test_only_the_leaders_environment_counts(received, monkeypatch):
    with RealtimeLogger(host="127.0.0.1"):  # a worker that sets the variable signs all the same
        worker = run_python(
            "from toilcoord.rtlog import RealtimeLogger; RealtimeLogger.info('signed')",
            env=child_env(TOILCOORD_RTLOG_UNSIGNED="1"),
        )
        assert worker.returncode == 0, worker.stderr
        received.wait_for("signed")
        toil_worker = run_python(TOIL_WORKER, "dropped", env=child_env(TOILCOORD_RTLOG_UNSIGNED="1"))
        assert toil_worker.returncode == 0, toil_worker.stderr
        wait_until(lambda: leader_server().statistics()["forged"] == 1)
    monkeypatch.setenv("TOILCOORD_RTLOG_UNSIGNED", "1")
    with RealtimeLogger(host="127.0.0.1", secret="the caller's own"):  # an explicit secret wins
        assert os.environ[PREFIX + "SECRET"] == "the caller's own"
    assert received.messages() == ["signed"]


def test_realtime_logger_logger_is_always_a_logger():
    assert isinstance(RealtimeLogger.logger, logging.Logger)
    assert RealtimeLogger.logger.name == "toil-rt"
    with RealtimeLogger(host="127.0.0.1"):
        assert RealtimeLogger.getLogger() is RealtimeLogger.logger
    assert isinstance(RealtimeLogger.logger, logging.Logger)
    RealtimeLogger.logger = None  # how Toil's code resets it: configured afresh, one handler at most
    os.environ[PREFIX + "ADDRESS"] = "127.0.0.1:9"
    try:
        for _ in range(2):
            RealtimeLogger.logger = None
            assert RealtimeLogger.getLogger() is logging.getLogger("toil-rt")
        assert sum(isinstance(h, RealtimeLogHandler) for h in logging.getLogger("toil-rt").handlers) == 1
    finally:
        del os.environ[PREFIX + "ADDRESS"]
        RealtimeLogger._resetLogger()
    assert not any(isinstance(h, RealtimeLogHandler) for h in logging.getLogger("toil-rt").handlers)


SILENCER = """
import logging

def suppress_exotic_logging(names):
    for name in names:
        logging.getLogger(name).setLevel(logging.CRITICAL)
"""


def test_our_warnings_survive_toils_silencing_of_other_packages(caplog):
    import toilcoord
    from toilcoord.rtlog import keep_package_logs_audible

    namespace = {"__name__": "toil.statsAndLogging"}  # as Toil's logging set-up runs
    exec(compile(SILENCER, "statsAndLogging.py", "exec"), namespace)
    package = logging.getLogger(toilcoord.__name__)
    assert keep_package_logs_audible() is package
    before = package.level
    try:
        namespace["suppress_exotic_logging"]([toilcoord.__name__, "boto3"])
        assert package.level == before
        assert logging.getLogger("boto3").level == logging.CRITICAL
        with caplog.at_level(logging.WARNING):
            logging.getLogger(toilcoord.__name__ + ".locks").warning("lock retried")
        assert "lock retried" in caplog.text
        package.setLevel(logging.CRITICAL)  # a user's own choice still works
        assert package.level == logging.CRITICAL
    finally:
        package.setLevel(before)
        logging.getLogger("boto3").setLevel(logging.NOTSET)


# ------------------------------------------------------- fuzz: datagrams


def random_json_value(rng, depth=0):
    choice = rng.randrange(12 if depth < 3 else 8)
    return [
        lambda: None,
        lambda: rng.random() < 0.5,
        lambda: rng.randint(-(2**70), 2**70),
        lambda: rng.choice([0.0, -1.5, 1e308, -1e308, float("inf"), float("-inf"), float("nan"), 1e11, 3e9]),
        lambda: rng.choice(
            [
                "",
                "x",
                "%s",
                "%d",
                "%c",
                "%(k)s",
                "%*d",
                "%.*f",
                "%0999999999d",
                "%-99999s",
                "%",
                "%%",
                "\ud800",
                "\x00",
                "é" * 50,
                "%(" * 30,
            ]
        ),
        lambda: rng.randint(0, 0x10FFFF * 100),
        lambda: "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(8)),
        lambda: rng.choice([10**10, -1, 0x110000, 2**63]),
        lambda: [random_json_value(rng, depth + 1) for _ in range(rng.randrange(4))],
        lambda: {
            rng.choice(["k", "msg", "", "a b"]): random_json_value(rng, depth + 1) for _ in range(rng.randrange(3))
        },
        lambda: [random_json_value(rng, depth + 1)],
        lambda: {"k": random_json_value(rng, depth + 1)},
    ][choice]()


FIELDS = [
    "name",
    "levelno",
    "levelname",
    "msg",
    "args",
    "created",
    "msecs",
    "relativeCreated",
    "lineno",
    "pathname",
    "exc_text",
    "stack_info",
    "thread",
    "process",
    "rt_seq",
    "rt_sender",
    "funcName",
    "getMessage",
    "__dict__",
    "exc_info",
    "message",
    "asctime",
    "extra",
]


def hostile_datagram(rng, real):
    kind = rng.randrange(6)
    if kind == 0:  # random bytes
        return random_bytes(rng, rng.randrange(1, 1200))
    if kind == 1:  # a real record with bytes flipped or cut
        data = bytearray(real)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.getrandbits(8)
        return bytes(data[: rng.randrange(1, len(data) + 1)] if rng.random() < 0.3 else data)
    fields = json.loads(real)
    if kind == 2:  # fields given random values
        for _ in range(rng.randint(1, 4)):
            fields[rng.choice(FIELDS)] = random_json_value(rng)
    elif kind == 3:  # a hostile format with hostile arguments
        fields["msg"] = rng.choice(["%c", "%d", "%*d", "%.*f", "%0999999999d", "%s %s", "%(a)s", "%x", "%%%s"])
        fields["args"] = random_json_value(rng)
    elif kind == 4:  # hostile times
        fields[rng.choice(["created", "msecs", "relativeCreated"])] = random_json_value(rng)
    else:  # deep nesting, huge numbers, odd escapes as raw text
        return rng.choice(
            [
                b"[" * 5000 + b"]" * 5000,
                b'{"name":"n","levelno":20,"msg":' + b"1" * 5000 + b"}",
                b'{"name":"n","levelno":20,"msg":"\\ud800\\udc00\\u0000"}',
                b'{"name":"n","levelno":20,"msg":"x","args":' + b"[" * 3000 + b"]" * 3000 + b"}",
            ]
        )
    return json.dumps(fields).encode()


class Formatting(logging.Handler):
    """Formats every received record as a leader's handler would."""

    def __init__(self):
        super().__init__()
        self.level = float("-inf")  # see records of any level, negative ones too
        self.setFormatter(
            logging.Formatter(
                "%(asctime)s %(msecs)03d %(relativeCreated)d %(levelname)s %(name)s %(lineno)d %(message)s"
            )
        )
        self.seen = []
        self.errors = []
        self.changed = threading.Condition()

    def emit(self, record):
        try:
            text = self.format(record)
        except Exception as error:  # what a leader's formatter would choke on
            self.errors.append("%r: %r" % (error, record.__dict__))
            text = ""
        with self.changed:
            self.seen.append(text)
            self.changed.notify_all()

    def wait_for(self, marker, timeout=30):
        deadline = time.monotonic() + timeout
        with self.changed:
            while not any(marker in text for text in self.seen[-50:]):
                if not self.changed.wait(max(0.0, deadline - time.monotonic())):
                    return False
        return True


def fuzz_datagrams(count, batch=25):
    rng = rng_for("datagrams")
    handler = RealtimeLogHandler("127.0.0.1:9")
    real = handler.encode(logging.LogRecord("worker", logging.INFO, "/w/job.py", 7, "step %d of %s", (3, "x"), None))
    handler.close()
    server = RealtimeLogServer("127.0.0.1", 0, local_socket=False)
    receiver = logging.getLogger(server.logger_name)
    formatting, propagate = Formatting(), receiver.propagate
    receiver.addHandler(formatting)
    receiver.propagate = False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sent = 0
    try:
        for first in range(0, count, batch):
            datagrams = [hostile_datagram(rng, real) for _ in range(min(batch, count - first))]
            for datagram in datagrams:
                sender.sendto(datagram, server.server_address)
            sent += len(datagrams)
            marker = "sentinel-%d" % first
            sender.sendto(json.dumps({"name": "w", "levelno": 20, "msg": marker}).encode(), server.server_address)
            sent += 1
            # Paced so the kernel never drops: a missing sentinel means the server stopped.
            assert formatting.wait_for(marker), "the server stopped serving after datagrams %d-%d (seed %d): %r" % (
                first,
                first + len(datagrams),
                SEED,
                [d[:120] for d in datagrams],
            )
        stats = server.statistics()
    finally:
        sender.close()
        server.shutdown()
        server.server_close()
        receiver.removeHandler(formatting)
        receiver.propagate = propagate
    assert not formatting.errors, formatting.errors[:3]
    assert stats["received"] + stats["malformed"] == sent
    assert stats["received"] == len(formatting.seen)


@pytest.mark.parametrize("count", sizes(600, 30000))
def test_hostile_datagrams_never_stop_the_leader_or_break_its_formatters(count):
    fuzz_datagrams(count)
