from __future__ import annotations

import errno
import functools
import gc
import importlib.util
import logging
import os
import pickle
import signal
import stat
import subprocess
import sys
import threading

import pytest

from toilcoord.deferred import DeferredFunction, DeferredFunctionManager

from conftest import child_env, on_network_filesystem, run_python
from fuzzing import SEED, random_bytes, rng_for, sizes

pytestmark = pytest.mark.timeout(60)

# Deferred functions the tests' processes share: a module every one of them
# imports by name, as a pipeline's workers import its code.
HELPERS = """
import os, time

def record(path, text):
    with open(path, "a") as stream:
        stream.write(text + "\\n")

def fail(message):
    raise ValueError(message)

def hang_where_told(path, text):
    # In a process told so: tell the test that the previous function has
    # returned (and been marked done), then hang until killed.
    notify_fd = os.environ.get("DFHELPERS_HANG_FD")
    if notify_fd is not None:
        os.write(int(notify_fd), b"!")
        time.sleep(60)
    record(path, text)

def interrupt_once(flag, path, text):
    if not os.path.exists(flag):
        open(flag, "w").close()
        raise KeyboardInterrupt
    record(path, text)

class Recorder:
    def __init__(self, path):
        self.path = path
    def method(self, text):
        record(self.path, text)
    @classmethod
    def class_method(cls, path, text):
        record(path, text)
    @staticmethod
    def static_method(path, text):
        record(path, text)

module_lambda = lambda path, text: record(path, text)

def make_local_instance(path, text):
    class Local:
        __slots__ = ("path", "text")
        def __init__(self, path, text):
            self.path, self.text = path, text
        def __call__(self):
            record(self.path, self.prefix() + self.text)
        @classmethod
        def prefix(cls):
            return cls.__name__.lower() + " "
    return Local(path, text)

def make_nested(path):
    prefix = "nested "
    def nested(text):
        record(path, prefix + text)
    return nested
"""

# An owner process: makes a manager in argv[1], recording into argv[2]; the
# test appends what it does inside.
OWNER = """
import functools, os, shutil, sys, time
import dfhelpers
from toilcoord.deferred import DeferredFunctionManager
base, out = sys.argv[1], sys.argv[2]
manager = DeferredFunctionManager(base)
"""

WAIT_TO_BE_KILLED = """
    print("ready", flush=True)
    time.sleep(60)
"""

# Another process that opens (and closes) a manager, running orphans.
RUN_ORPHANS = """
import sys
from toilcoord.deferred import DeferredFunctionManager
with DeferredFunctionManager(sys.argv[1]) as manager:
    with manager.open():
        pass
"""


@pytest.fixture(scope="session")
def helpers_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("helpers")
    (directory / "dfhelpers.py").write_text(HELPERS)
    sys.path.insert(0, str(directory))
    try:
        yield str(directory)
    finally:
        sys.path.remove(str(directory))
        sys.modules.pop("dfhelpers", None)


@pytest.fixture
def dfhelpers(helpers_dir):
    import dfhelpers

    return dfhelpers


@pytest.fixture
def env(helpers_dir):
    environment = child_env()
    environment["PYTHONPATH"] = helpers_dir + os.pathsep + environment["PYTHONPATH"]
    return environment


@pytest.fixture
def base(tmp_path):
    directory = tmp_path / "work"
    directory.mkdir()
    return str(directory)


@pytest.fixture
def out(tmp_path):
    return str(tmp_path / "out.txt")


def lines(path):
    try:
        with open(path) as stream:
            return stream.read().splitlines()
    except FileNotFoundError:
        return []


def state_dir(base):
    return os.path.join(base, DeferredFunctionManager.STATE_DIR_STEM)


def state_files(base):
    try:
        return sorted(os.listdir(state_dir(base)))
    except FileNotFoundError:
        return []


def start_owner(children, env, body, *args, **popen):
    child = children.python(OWNER + body, *args, env=env, stdout=subprocess.PIPE, text=True, **popen)
    assert child.stdout.readline().strip() == "ready"
    return child


def kill(child):
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL


def run_orphans_elsewhere(base, env):
    result = run_python(RUN_ORPHANS, base, env=env)
    assert result.returncode == 0, result.stderr
    return result


def run_orphans_here(base):
    with DeferredFunctionManager(base) as manager:
        with manager.open():
            pass


def open_fds():
    return sorted(os.listdir("/proc/self/fd"))


# ------------------------------------------------------------ crashes


def test_owner_killed_inside_open_has_both_functions_run_once_by_the_next_open(base, out, env, children):
    owner = start_owner(
        children,
        env,
        """
with manager.open() as defer:
    defer(dfhelpers.record, out, "first")
    defer(dfhelpers.record, out, "second")
"""
        + WAIT_TO_BE_KILLED,
        base,
        out,
    )
    kill(owner)
    assert lines(out) == []
    assert len(state_files(base)) == 1

    run_orphans_elsewhere(base, env)
    assert lines(out) == ["first", "second"]
    run_orphans_elsewhere(base, env)
    run_orphans_here(base)
    assert lines(out) == ["first", "second"]
    assert state_files(base) == []


def hanging(env, notify_write):
    return dict(env, DFHELPERS_HANG_FD=str(notify_write)), {"pass_fds": (notify_write,)}


def wait_for_notification(notify_read):
    assert os.read(notify_read, 1) == b"!"


def test_owner_killed_right_after_the_first_function_returned_never_runs_it_again(base, out, env, children):
    notify_read, notify_write = os.pipe()
    try:
        owner_env, popen = hanging(env, notify_write)
        owner = start_owner(
            children,
            owner_env,
            """
with manager.open() as defer:
    defer(dfhelpers.record, out, "first")
    defer(dfhelpers.hang_where_told, out, "second")
    print("ready", flush=True)
""",
            base,
            out,
            **popen,
        )
        wait_for_notification(notify_read)  # "second" has started in the owner
        kill(owner)
    finally:
        os.close(notify_read)
        os.close(notify_write)
    assert lines(out) == ["first"]

    run_orphans_elsewhere(base, env)
    assert lines(out) == ["first", "second"]
    run_orphans_here(base)
    assert lines(out) == ["first", "second"]


def test_an_orphan_runner_killed_midway_leaves_what_it_did_not_finish_and_only_that(base, out, env, children):
    owner = start_owner(
        children,
        env,
        """
with manager.open() as defer:
    defer(dfhelpers.record, out, "first")
    defer(dfhelpers.hang_where_told, out, "second")
    defer(dfhelpers.record, out, "third")
"""
        + WAIT_TO_BE_KILLED,
        base,
        out,
    )
    kill(owner)
    notify_read, notify_write = os.pipe()
    try:
        runner_env, popen = hanging(env, notify_write)
        runner = children.python(RUN_ORPHANS, base, env=runner_env, **popen)
        wait_for_notification(notify_read)  # the runner finished "first" and is inside "second"
        kill(runner)
    finally:
        os.close(notify_read)
        os.close(notify_write)
    assert lines(out) == ["first"]

    run_orphans_elsewhere(base, env)
    assert lines(out) == ["first", "second", "third"]
    assert state_files(base) == []


# -------------------------------------------------- torn and corrupt files


def orphan_with_records(children, env, base, out, count):
    """A dead owner's state file holding *count* records of equal size."""
    defers = "".join(f'    defer(dfhelpers.record, out, "record {i}")\n' for i in range(count))
    owner = start_owner(children, env, "with manager.open() as defer:\n" + defers + WAIT_TO_BE_KILLED, base, out)
    kill(owner)
    (name,) = state_files(base)
    path = os.path.join(state_dir(base), name)
    size = os.path.getsize(path)
    assert size % count == 0
    return path, size // count


def flip(path, offset):
    with open(path, "r+b") as stream:
        stream.seek(offset)
        byte = stream.read(1)
        stream.seek(offset)
        stream.write(bytes((byte[0] ^ 0xFF,)))


def errors(caplog):
    return [record for record in caplog.records if record.levelno >= logging.ERROR]


def test_a_torn_tail_is_logged_and_skipped_and_the_records_before_it_run(base, out, env, children, caplog, dfhelpers):
    path, record_size = orphan_with_records(children, env, base, out, 3)
    os.truncate(path, 2 * record_size + record_size // 2)
    caplog.set_level(logging.INFO)
    run_orphans_here(base)
    assert lines(out) == ["record 0", "record 1"]
    (error,) = errors(caplog)
    assert "torn" in error.getMessage() and path in error.getMessage()
    assert state_files(base) == []  # not left to poison later workers


def test_a_corrupt_payload_is_logged_and_skipped_and_the_records_around_it_run(
    base, out, env, children, caplog, dfhelpers
):
    # Its header is intact, so the next record's frame is known.
    path, record_size = orphan_with_records(children, env, base, out, 3)
    flip(path, record_size + record_size // 2)
    caplog.set_level(logging.INFO)
    run_orphans_here(base)
    assert lines(out) == ["record 0", "record 2"]
    (error,) = errors(caplog)
    assert "corrupt" in error.getMessage() and path in error.getMessage()
    assert state_files(base) == []


@pytest.mark.parametrize("where", ["header", "length"])
def test_after_a_corrupt_header_nothing_more_is_read(base, out, env, children, caplog, dfhelpers, where):
    # Records are read only at frame boundaries from offset 0: no search for
    # a record marker further on, where a planted payload could wait.
    path, record_size = orphan_with_records(children, env, base, out, 3)
    flip(path, record_size + {"header": 0, "length": 5}[where])
    caplog.set_level(logging.INFO)
    run_orphans_here(base)
    assert lines(out) == ["record 0"]
    (error,) = errors(caplog)
    assert "unreadable" in error.getMessage() and path in error.getMessage()
    assert state_files(base) == [], "it began with a record: ours, done with"


def test_a_file_of_garbage_runs_nothing_and_is_left_alone(base, caplog):
    DeferredFunctionManager(base).close()  # makes the state directory
    prefix = DeferredFunctionManager.OWN_PREFIX + DeferredFunctionManager.PREFIX
    path = os.path.join(state_dir(base), prefix + "garbage")
    with open(path, "wb") as stream:
        stream.write(b"\x00" + os.urandom(4999))
    os.chmod(path, 0o600)
    caplog.set_level(logging.INFO)
    run_orphans_here(base)
    run_orphans_here(base)
    DeferredFunctionManager.cleanupWorker(base)
    complaints = [error for error in errors(caplog) if "does not begin with a record" in error.getMessage()]
    assert len(complaints) == 1, "reported once, not on every scan"
    assert state_files(base) == [os.path.basename(path)], "not provably ours: never deleted"


# What Toil's DeferredFunctionManager leaves for a dead worker: a dill pickle
# of a DeferredFunction namedtuple, named by mkstemp (func + 8 characters).
TOIL_STATE = b"\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x00\x8c\x0etoil.deferred\x94\x8c\x10DeferredFunction\x94."


def test_toils_state_files_are_neither_read_locked_run_nor_removed(base, caplog):
    DeferredFunctionManager(base).close()
    path = os.path.join(state_dir(base), "funcq1w_2e3r")
    with open(path, "wb") as stream:
        stream.write(TOIL_STATE)
    os.chmod(path, 0o600)
    mtime_before = os.stat(path).st_mtime_ns
    caplog.set_level(logging.DEBUG)
    with DeferredFunctionManager(base) as manager:
        with manager.open():
            pass
    DeferredFunctionManager.cleanupWorker(base)
    assert errors(caplog) == [] and "funcq1w_2e3r" not in caplog.text
    assert state_files(base) == ["funcq1w_2e3r"]
    with open(path, "rb") as stream:
        assert stream.read() == TOIL_STATE
    assert os.stat(path).st_mtime_ns == mtime_before


def test_our_state_files_have_names_toils_scanner_skips(base):
    with DeferredFunctionManager(base) as manager:
        name = os.path.basename(manager.stateFileName)
        # Toil's _runOrphanedDeferredFunctions reads every func* name not ending in .tmp.
        assert not name.startswith(DeferredFunctionManager.PREFIX)
        assert name.startswith("toilcoord-func") and state_files(base) == [name]


def test_an_older_toilcoords_func_named_orphan_still_runs(base, out, env, children):
    owner = start_owner(
        children,
        env,
        """
with manager.open() as defer:
    defer(dfhelpers.record, out, "older name")
    old = os.path.join(os.path.dirname(manager.stateFileName), "func" + "0123456789abcdef")
    os.link(manager.stateFileName, old)
    os.unlink(manager.stateFileName)
"""
        + WAIT_TO_BE_KILLED,
        base,
        out,
    )
    kill(owner)
    run_orphans_here(base)
    assert lines(out) == ["older name"]
    assert state_files(base) == []


# ---------------------------------------------------- kinds of callables

EVERY_KIND = """
victim_file, victim_dir = sys.argv[3], sys.argv[4]

main_lambda = lambda text: dfhelpers.record(out, text)

def main_function(text, depth=2):
    if depth:
        return main_function(text, depth - 1)  # refers to itself through its globals
    dfhelpers.record(out, text)

def make_main_closure():
    tag = "main closure"
    def closure():
        dfhelpers.record(out, tag)
    return closure

class MainRecorder:
    def __init__(self, text):
        self.text = text
    def run(self):
        dfhelpers.record(out, self.text)

def make_main_local():
    class Sub(MainRecorder):
        def run(self):
            super().run()  # a closure over __class__: the class refers to itself
    return Sub("main local class")

with manager.open() as defer:
    defer(dfhelpers.record, out, "function")
    defer(os.remove, victim_file)
    defer(shutil.rmtree, victim_dir)
    defer(dfhelpers.Recorder(out).method, "bound method")
    defer(dfhelpers.Recorder.class_method, out, "classmethod")
    defer(dfhelpers.Recorder.static_method, out, "staticmethod")
    defer(functools.partial(dfhelpers.record, out), "partial")
    defer(dfhelpers.module_lambda, out, "module lambda")
    defer(dfhelpers.make_nested(out), "closure")
    defer(main_lambda, "main lambda")
    defer(main_function, "main function")
    defer(make_main_closure())
    defer(functools.partial(lambda path, text: dfhelpers.record(path, text), out), "partial of a lambda")
    defer(dfhelpers.record, path=out, text="keywords")
    defer(dfhelpers.make_local_instance(out, "class instance"))
    defer(MainRecorder("main class").run)
    defer(make_main_local().run)
"""

# What the every-kind script prints, in the order it defers them.
EVERY_KIND_ORDER = [
    "function",
    "bound method",
    "classmethod",
    "staticmethod",
    "partial",
    "module lambda",
    "nested closure",
    "main lambda",
    "main function",
    "main closure",
    "partial of a lambda",
    "keywords",
    "local class instance",
    "main class",
    "main local class",
]
EVERY_KIND_LINES = sorted(EVERY_KIND_ORDER)


def victims(tmp_path):
    victim_file = tmp_path / "victim-file"
    victim_file.write_text("x")
    victim_dir = tmp_path / "victim-dir"
    (victim_dir / "sub").mkdir(parents=True)
    (victim_dir / "sub" / "file").write_text("x")
    return str(victim_file), str(victim_dir)


def test_every_kind_of_callable_deferred_by_a_killed_owner_runs_in_another_process(
    base, out, env, children, tmp_path, caplog
):
    victim_file, victim_dir = victims(tmp_path)
    owner = start_owner(children, env, EVERY_KIND + WAIT_TO_BE_KILLED, base, out, victim_file, victim_dir)
    kill(owner)
    caplog.set_level(logging.INFO)
    result = run_orphans_elsewhere(base, env)
    assert "ERROR" not in result.stderr, result.stderr
    assert sorted(lines(out)) == EVERY_KIND_LINES
    assert not os.path.exists(victim_file) and not os.path.exists(victim_dir)


def test_every_kind_of_callable_runs_in_its_own_process_in_order(base, out, env, tmp_path):
    victim_file, victim_dir = victims(tmp_path)
    result = run_python(OWNER + EVERY_KIND, base, out, victim_file, victim_dir, env=env)
    assert result.returncode == 0, result.stderr
    assert "ERROR" not in result.stderr, result.stderr
    assert lines(out) == EVERY_KIND_ORDER
    assert not os.path.exists(victim_file) and not os.path.exists(victim_dir)


def test_functions_of_a_module_run_with_dash_m_run_in_another_process(base, out, env, children, tmp_path):
    package = tmp_path / "dfmainpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "job.py").write_text(
        "import sys, time\n"
        "import dfhelpers\n"
        "from toilcoord.deferred import DeferredFunctionManager\n"
        "def module_function(path):\n"
        "    dfhelpers.record(path, 'module function ' + __name__)\n"
        "if __name__ == '__main__':\n"
        "    base, out = sys.argv[1], sys.argv[2]\n"
        "    manager = DeferredFunctionManager(base)\n"
        "    with manager.open() as defer:\n"
        "        defer(module_function, out)\n"
        "        defer(lambda path=out: dfhelpers.record(path, 'lambda ' + __name__))\n"
        "        print('ready', flush=True)\n"
        "        time.sleep(60)\n"
    )
    env = dict(env, PYTHONPATH=str(tmp_path) + os.pathsep + env["PYTHONPATH"])
    owner = children.python(
        "import runpy, sys; runpy.run_module('dfmainpkg.job', run_name='__main__', alter_sys=True)",
        base,
        out,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert owner.stdout.readline().strip() == "ready"
    kill(owner)
    run_orphans_elsewhere(base, env)
    # The lambda's globals are the module's, imported by name (so its own
    # __name__, not "__main__"; and not what the main block defined).
    assert lines(out) == ["module function dfmainpkg.job", "lambda dfmainpkg.job"]


# ------------------------------------------------------------- creating


def test_create_serialises_eagerly_and_names_what_it_cannot_serialise():
    lock = threading.Lock()
    with pytest.raises(TypeError, match=r"cannot defer record: argument 1 \(<.*lock.*\) cannot be serialised"):
        DeferredFunction.create(record, "x", lock)
    with pytest.raises(TypeError, match=r"keyword argument guard=<.*lock.*> cannot be serialised"):
        DeferredFunction.create(record, "x", guard=lock)
    with pytest.raises(TypeError, match=r"the function .* cannot be serialised"):
        DeferredFunction.create(functools.partial(record, lock))
    with pytest.raises(TypeError, match="not callable"):
        DeferredFunction.create("rm -rf /tmp/x")
    # A closure's value is captured when created, not when run.
    value = ["before"]
    deferred = DeferredFunction.create(lambda: value[0])
    value[0] = "after"
    assert deferred.invoke() == "before"


def record(path, text):
    with open(path, "a") as stream:
        stream.write(text + "\n")


def test_a_class_of_the_main_script_travels_by_value_but_not_one_with_a_metaclass(env):
    result = run_python(
        """
import pickle
from toilcoord.deferred import DeferredFunction
class Local:
    def method(self):
        return "ran " + type(self).__name__
deferred = DeferredFunction.create(Local().method)
del Local
print(deferred.invoke())
def make():
    class Meta(type):
        pass
    class WithMeta(metaclass=Meta):
        def method(self):
            pass
    return WithMeta()
try:
    DeferredFunction.create(make().method)
except TypeError as error:
    print(error)
""",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    ran, refused = result.stdout.splitlines()
    assert ran == "ran Local"
    assert "has the metaclass" in refused and "make.<locals>.WithMeta" in refused


def test_create_takes_the_function_by_keyword_as_toil_does():
    deferred = DeferredFunction.create(function=record, path="/nonexistent/never", text="x")
    assert deferred.name == "record"
    function = pickle.loads(deferred.function)
    assert function is record and pickle.loads(deferred.kwargs) == {"path": "/nonexistent/never", "text": "x"}
    # Given positionally, a function= keyword is the callable's own.
    deferred = DeferredFunction.create(dict, function="kept")
    assert deferred.invoke() == {"function": "kept"}
    with pytest.raises(TypeError, match="needs the function"):
        DeferredFunction.create()
    with pytest.raises(TypeError, match="needs the function"):
        DeferredFunction.create(text="x")


def test_module_is_a_module_descriptor_as_in_toil(tmp_path):
    from toilcoord.modules import ModuleDescriptor

    deferred = DeferredFunction.create(record, "/nonexistent", "x")
    assert isinstance(deferred.module, ModuleDescriptor)
    assert deferred.module == ModuleDescriptor.forModule(__name__)
    assert deferred.module.name == __name__
    assert DeferredFunction.create(functools.partial(record, "p"), "x").module == deferred.module
    assert DeferredFunction.create(os.getpid).module is None, "a builtin's module has no file"
    assert DeferredFunction.create(lambda: 0).module == deferred.module


def test_a_hot_deployed_module_is_made_loadable_when_unpickling_cannot_import_it(tmp_path, monkeypatch):
    calls = []

    class Descriptor:
        def makeLoadable(self):
            calls.append("made loadable")
            sys.path.insert(0, str(tmp_path))

    (tmp_path / "dfshipped.py").write_text("def greet(name):\n    return 'hello ' + name\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import dfshipped

        deferred = DeferredFunction.create(dfshipped.greet, "worker")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("dfshipped", None)
    try:
        with pytest.raises(ModuleNotFoundError):
            deferred._replace(module=None).invoke()
        assert deferred._replace(module=Descriptor()).invoke() == "hello worker"
        assert calls == ["made loadable"]
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("dfshipped", None)


def test_str_and_repr_name_the_function_and_invoke_returns_its_result():
    from collections import defaultdict

    deferred = DeferredFunction.create(defaultdict, None, {"x": 1}, y=2)
    assert repr(deferred) == str(deferred) == "DeferredFunction(defaultdict, ...)"
    assert deferred.invoke() == defaultdict(None, x=1, y=2)
    assert deferred.name == "defaultdict" and deferred.module.name == "collections"
    assert DeferredFunction._fields == ("function", "args", "kwargs", "name", "module")
    assert str(DeferredFunction.create(functools.partial(os.getpid))) == "DeferredFunction(partial(getpid), ...)"


def test_code_made_by_another_python_version_is_refused_with_a_logged_error(base, out, caplog, dfhelpers):
    deferred = DeferredFunction.create(lambda: dfhelpers.record(out, "foreign"))
    magic = importlib.util.MAGIC_NUMBER
    assert deferred.function.count(magic) == 1
    foreign = deferred._replace(function=deferred.function.replace(magic, b"\0\0\r\n"))
    caplog.set_level(logging.INFO)
    with DeferredFunctionManager(base) as manager:
        with manager.open() as defer:
            defer(foreign)
            defer(dfhelpers.record, out, "native")
    assert lines(out) == ["native"]
    (error,) = errors(caplog)
    assert "cannot run on" in error.getMessage() and error.exc_info is None


# ---------------------------------------------------------- running


def test_a_failing_function_is_logged_once_and_the_rest_still_run(base, out, caplog, dfhelpers):
    caplog.set_level(logging.INFO)
    with DeferredFunctionManager(base) as manager:
        with manager.open() as defer:
            defer(dfhelpers.record, out, "before")
            defer(dfhelpers.fail, "boom")
            defer(dfhelpers.record, out, "after")
    assert lines(out) == ["before", "after"]
    (error,) = errors(caplog)
    assert "DeferredFunction(fail, ...)" in error.getMessage() and "failed" in error.getMessage()
    assert error.exc_info[0] is ValueError


FAILING_WORKER = """
import logging, sys
import dfhelpers
logging.basicConfig()  # the worker's own log: stderr
from toilcoord.deferred import DeferredFunctionManager
with DeferredFunctionManager(sys.argv[1]) as manager:
    with manager.open() as defer:
        defer(dfhelpers.fail, "boom from the worker")
        defer(dfhelpers.record, sys.argv[2], "still ran")
"""


def test_a_failing_function_in_a_worker_is_logged_to_the_listening_leader_and_once_locally(base, out, helpers_dir):
    from toilcoord.rtlog import RealtimeLogger

    arrived = threading.Event()
    received = []

    class Collector(logging.Handler):
        def emit(self, record):
            received.append(record)
            if "failed" in record.getMessage():
                arrived.set()

    collector = Collector()
    rt_logger = logging.getLogger("toil-rt")
    rt_logger.addHandler(collector)
    try:
        with RealtimeLogger(level="INFO", host="127.0.0.1"):
            worker_env = child_env()  # now holds the leader's address
            worker_env["PYTHONPATH"] = helpers_dir + os.pathsep + worker_env["PYTHONPATH"]
            result = run_python(FAILING_WORKER, base, out, env=worker_env)
            assert arrived.wait(30), [record.getMessage() for record in received]
    finally:
        rt_logger.removeHandler(collector)
        RealtimeLogger._resetLogger()
    assert result.returncode == 0, result.stderr
    assert lines(out) == ["still ran"]
    (failure,) = [record for record in received if "failed" in record.getMessage()]
    assert "DeferredFunction(fail, ...)" in failure.getMessage()
    assert "boom from the worker" in failure.getMessage() + str(failure.exc_text)
    assert result.stderr.count("failed") == 1, result.stderr  # once locally too


def test_own_functions_run_in_order_at_exit_and_orphans_at_entry(base, out, env, children, dfhelpers):
    owner = start_owner(
        children,
        env,
        """
with manager.open() as defer:
    defer(dfhelpers.record, out, "orphan")
"""
        + WAIT_TO_BE_KILLED,
        base,
        out,
    )
    kill(owner)
    with DeferredFunctionManager(base) as manager:
        with manager.open() as defer:
            assert lines(out) == ["orphan"]
            for number in range(5):
                defer(dfhelpers.record, out, f"own {number}")
            assert lines(out) == ["orphan"]
        assert lines(out) == ["orphan"] + [f"own {number}" for number in range(5)]
        with manager.open() as defer:  # a second job on the same manager
            defer(dfhelpers.record, out, "second job")
        assert lines(out)[-1] == "second job" and len(lines(out)) == 7


def test_defer_accepts_a_deferred_function_and_nothing_after_it(base, out, dfhelpers):
    with DeferredFunctionManager(base) as manager:
        with manager.open() as defer:
            deferred = DeferredFunction.create(dfhelpers.record, out, "made earlier")
            defer(deferred)
            with pytest.raises(TypeError, match="no further arguments"):
                defer(deferred, "extra")
    assert lines(out) == ["made earlier"]


def test_defer_from_several_threads_records_every_call(base, out, dfhelpers):
    with DeferredFunctionManager(base) as manager:
        with manager.open() as defer:

            def register(thread):
                for number in range(100):
                    defer(dfhelpers.record, out, f"{thread} {number}")

            threads = [threading.Thread(target=register, args=(thread,)) for thread in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    assert sorted(lines(out)) == sorted(f"{thread} {number}" for thread in range(4) for number in range(100))


def test_misuse_raises_clear_errors(base, out, dfhelpers):
    manager = DeferredFunctionManager(base)
    with manager.open() as defer:
        with pytest.raises(RuntimeError, match="nested"):
            with manager.open():
                pass
        with pytest.raises(RuntimeError, match="inside open"):
            manager.close()
    with pytest.raises(RuntimeError, match="outside DeferredFunctionManager.open"):
        defer(dfhelpers.record, out, "late")
    manager.close()
    manager.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        with manager.open():
            pass
    with pytest.raises(TypeError, match="stateDirBase"):
        DeferredFunctionManager(42)
    with pytest.raises(FileNotFoundError, match="base directory"):
        DeferredFunctionManager(os.path.join(base, "missing"))
    assert lines(out) == []


def interrupted_job(base, out, flag, dfhelpers):
    """A manager whose job's second function was interrupted."""
    manager = DeferredFunctionManager(base)
    try:
        with manager.open() as defer:
            defer(dfhelpers.record, out, "first")
            defer(dfhelpers.interrupt_once, flag, out, "interrupted")
            defer(dfhelpers.record, out, "last")
    except KeyboardInterrupt:
        pass  # (not kept: a traceback would keep the manager alive)
    else:
        raise AssertionError("the KeyboardInterrupt did not propagate")
    assert lines(out) == ["first"]
    return manager


def test_close_runs_what_an_interrupted_job_left(base, out, tmp_path, dfhelpers):
    manager = interrupted_job(base, out, str(tmp_path / "flag"), dfhelpers)
    manager.close()
    assert lines(out) == ["first", "interrupted", "last"]
    assert state_files(base) == []


def test_an_interrupted_function_stays_pending_and_runs_again_elsewhere(base, out, tmp_path, dfhelpers):
    manager = interrupted_job(base, out, str(tmp_path / "flag"), dfhelpers)
    path = manager.stateFileName
    del manager  # __del__ runs no user code: it leaves the unfinished file to others
    gc.collect()
    assert os.path.exists(path)
    run_orphans_here(base)
    assert lines(out) == ["first", "interrupted", "last"]
    assert state_files(base) == []


# ----------------------------------------------------- lifetime and files


def test_close_and_context_manager_release_everything(base, out, dfhelpers):
    before = open_fds()
    with DeferredFunctionManager(base) as manager:
        assert len(open_fds()) > len(before)
        with manager.open() as defer:
            defer(dfhelpers.record, out, "x")
    assert open_fds() == before
    assert state_files(base) == []
    manager = DeferredFunctionManager(base)
    del manager  # the fallback
    gc.collect()
    assert open_fds() == before
    assert state_files(base) == []


def test_close_runs_the_functions_of_a_process_that_died_meanwhile(base, out, env, children):
    manager = DeferredFunctionManager(base)
    owner = start_owner(
        children,
        env,
        """
with manager.open() as defer:
    defer(dfhelpers.record, out, "orphan")
"""
        + WAIT_TO_BE_KILLED,
        base,
        out,
    )
    kill(owner)
    manager.close()
    assert lines(out) == ["orphan"]
    assert state_files(base) == []


def test_a_process_never_takes_over_its_own_files_where_locks_are_per_process(base, out, monkeypatch, dfhelpers):
    import toilcoord.deferred as deferred

    def per_process_take_over(path):
        # NFS emulates flock with POSIX locks, which never conflict with
        # the process's own: every "take over" by the owner succeeds.
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    monkeypatch.setattr(deferred, "take_over", per_process_take_over)
    with DeferredFunctionManager(base) as first:
        with first.open() as defer:
            defer(dfhelpers.record, out, "first's")
            with DeferredFunctionManager(base) as second, second.open():
                pass
            DeferredFunctionManager.cleanupWorker(base)
            assert lines(out) == []
            assert os.path.exists(first.stateFileName)
    assert lines(out) == ["first's"]


def test_state_file_removed_from_under_the_worker_is_replaced(base, out, caplog, dfhelpers):
    caplog.set_level(logging.INFO)
    with DeferredFunctionManager(base) as manager:
        with manager.open() as defer:
            defer(dfhelpers.record, out, "before removal")
            os.remove(manager.stateFileName)
            defer(dfhelpers.record, out, "after removal")
        assert lines(out) == ["before removal", "after removal"]
        removed = manager.stateFileName
        with manager.open() as defer:
            assert manager.stateFileName != removed
            assert os.path.basename(manager.stateFileName) in state_files(base)
            defer(dfhelpers.record, out, "new file")
        assert "removed by someone else" in caplog.text
        if on_network_filesystem(base):
            return  # a directory holding an open file cannot be removed there
        import shutil

        shutil.rmtree(state_dir(base))
        with manager.open() as defer:
            defer(dfhelpers.record, out, "new directory")
    assert lines(out)[-2:] == ["new file", "new directory"]
    assert state_files(base) == []


def test_cleanup_worker_runs_orphans_spares_the_living_and_removes_the_directory_last(
    base, out, env, children, dfhelpers
):
    dead = start_owner(
        children,
        env,
        """
with manager.open() as defer:
    defer(dfhelpers.record, out, "dead")
"""
        + WAIT_TO_BE_KILLED,
        base,
        out,
    )
    kill(dead)
    live = children.python(
        OWNER
        + """
with manager.open() as defer:
    defer(dfhelpers.record, out, "live")
    print("ready", flush=True)
    sys.stdin.readline()
""",
        base,
        out,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert live.stdout.readline().strip() == "ready"

    DeferredFunctionManager.cleanupWorker(base)
    assert lines(out) == ["dead"]
    assert len(state_files(base)) == 1  # the live worker's file, and so the directory, remain

    live.stdin.write("go\n")
    live.stdin.flush()
    assert live.wait() == 0
    assert lines(out) == ["dead", "live"]
    DeferredFunctionManager.cleanupWorker(base)
    assert not os.path.exists(state_dir(base))
    DeferredFunctionManager.cleanupWorker(base)  # nothing there: nothing to do


@pytest.mark.parametrize("removed_through", ["this mount", "another client"])
def test_state_directory_removed_before_the_new_file_is_made_again(
    base, out, dfhelpers, monkeypatch, request, removed_through
):
    # A cleanupWorker removes the directory, empty, between the newcomer's
    # check of it and its create there: locally the create fails with
    # ENOENT; on NFS, removed through another client, with ESTALE (seen in
    # the NFS rig's run of test_cleanup_worker_racing_newcomers_never_breaks_them).
    import toilcoord.deferred as deferred

    twin_of = request.getfixturevalue("through_another_client") if removed_through == "another client" else str
    made = deferred._make_state_dir
    removed = []

    def made_then_removed(path):
        fd = made(path)
        if not removed:
            os.rmdir(twin_of(path))
            removed.append(path)
        return fd

    monkeypatch.setattr(deferred, "_make_state_dir", made_then_removed)
    with DeferredFunctionManager(base) as manager, manager.open() as defer:
        defer(dfhelpers.record, out, "ran")
    assert removed and lines(out) == ["ran"]


CHURN = """
import sys
import dfhelpers
from toilcoord.deferred import DeferredFunctionManager
base, out = sys.argv[1], sys.argv[2]
for number in range(150):
    with DeferredFunctionManager(base) as manager:
        with manager.open() as defer:
            defer(dfhelpers.record, out, str(number))
"""

CLEANUP_LOOP = """
import sys
from toilcoord.deferred import DeferredFunctionManager
for _ in range(300):
    DeferredFunctionManager.cleanupWorker(sys.argv[1])
"""


def test_cleanup_worker_racing_newcomers_never_breaks_them(base, out, env, children):
    workers = [children.python(CHURN, base, out, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    cleaner = children.python(CLEANUP_LOOP, base, env=env, stderr=subprocess.PIPE, text=True)
    for process in workers + [cleaner]:
        assert process.wait() == 0, process.stderr.read()
    assert sorted(lines(out)) == sorted(str(number) for number in range(150) for _ in range(2))


# ------------------------------------------------------------ fork

FORK_IN_OPEN = """
import traceback
status = 0
with manager.open() as defer:
    defer(dfhelpers.record, out, "parent")
    pid = os.fork()
    if pid == 0:
        try:
            defer(dfhelpers.record, out, "child")
            status = 1
        except RuntimeError as error:
            status = 0 if "forked" in str(error) else 2
# The child left the block without running its parent's function.
if pid == 0:
    try:
        with DeferredFunctionManager(base) as own, own.open() as defer:
            defer(dfhelpers.record, out, "child's own")
    except BaseException:
        traceback.print_exc()
        status = 3
    os._exit(status)
_, child_status = os.waitpid(pid, 0)
print("child exit", os.waitstatus_to_exitcode(child_status) if hasattr(os, "waitstatus_to_exitcode") else child_status >> 8)
"""


def test_a_forked_child_neither_defers_into_nor_runs_its_parents_functions(base, out, env):
    result = run_python(OWNER + FORK_IN_OPEN, base, out, env=env)
    assert result.returncode == 0, result.stderr
    assert "child exit 0" in result.stdout, result.stdout + result.stderr
    assert sorted(lines(out)) == ["child's own", "parent"]
    assert state_files(base) == []


def test_a_forked_child_does_not_keep_a_killed_parents_file_alive(base, out, env, children):
    # The child says "ready" (after fork's handlers ran in it) and lives on.
    owner = start_owner(
        children,
        env,
        """
with manager.open() as defer:
    defer(dfhelpers.record, out, "parent")
    if os.fork() == 0:
        print("ready", flush=True)
        sys.stdin.readline()  # lives until the test closes stdin
        os._exit(0)
    time.sleep(60)
""",
        base,
        out,
        stdin=subprocess.PIPE,
    )
    kill(owner)
    try:
        run_orphans_elsewhere(base, env)
        assert lines(out) == ["parent"]
    finally:
        owner.stdin.close()  # the grandchild exits


# ---------------------------------------------------------- safety


def test_state_directory_and_files_are_private_whatever_the_umask(base):
    old = os.umask(0)
    try:
        with DeferredFunctionManager(base) as manager:
            assert stat.S_IMODE(os.stat(state_dir(base)).st_mode) == 0o700
            assert stat.S_IMODE(os.stat(manager.stateFileName).st_mode) == 0o600
    finally:
        os.umask(old)


def test_an_existing_loose_state_directory_is_made_private(base):
    os.mkdir(state_dir(base), 0o755)
    os.chmod(state_dir(base), 0o755)
    DeferredFunctionManager(base).close()
    assert stat.S_IMODE(os.stat(state_dir(base)).st_mode) == 0o700


def test_a_symlinked_state_directory_is_refused(base, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", state_dir(base))
    with pytest.raises(PermissionError, match="not a directory"):
        DeferredFunctionManager(base)
    assert os.listdir(tmp_path / "elsewhere") == []


OTHER_UID = 65534


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_state_directory_of_another_user_is_refused(base):
    os.mkdir(state_dir(base), 0o700)
    os.chown(state_dir(base), OTHER_UID, OTHER_UID)
    with pytest.raises(PermissionError, match="owned by uid 65534"):
        DeferredFunctionManager(base)
    assert os.listdir(state_dir(base)) == []


def refusal_case(case, path):
    if case == "group-writable":
        os.chmod(path, 0o620)
    elif case == "world-writable":
        os.chmod(path, 0o602)
    else:
        if os.geteuid() != 0:
            pytest.skip("giving a file to another user needs root")
        os.chown(path, OTHER_UID, -1)


@pytest.mark.parametrize("case", ["group-writable", "world-writable", "another user's"])
def test_a_state_file_others_could_have_written_is_never_unpickled(base, out, env, children, caplog, case):
    owner = start_owner(
        children,
        env,
        """
with manager.open() as defer:
    defer(dfhelpers.record, out, "should not run")
"""
        + WAIT_TO_BE_KILLED,
        base,
        out,
    )
    kill(owner)
    (name,) = state_files(base)
    path = os.path.join(state_dir(base), name)
    refusal_case(case, path)
    caplog.set_level(logging.INFO)
    run_orphans_here(base)
    run_orphans_here(base)
    DeferredFunctionManager.cleanupWorker(base)
    assert lines(out) == []
    assert state_files(base) == [name]  # left alone
    refusals = [error for error in errors(caplog) if "refusing" in error.getMessage()]
    assert len(refusals) == 1 and path in refusals[0].getMessage()  # logged once, not on every scan


def test_symlinks_fifos_and_reserved_names_in_the_state_directory_are_left_alone(base, tmp_path):
    DeferredFunctionManager(base).close()
    directory = state_dir(base)
    target = tmp_path / "target"
    target.write_bytes(b"not a state file")
    os.symlink(target, os.path.join(directory, "funclink"))
    os.mkfifo(os.path.join(directory, "funcfifo"))
    with open(os.path.join(directory, "funcsetup" + DeferredFunctionManager.WIP_SUFFIX), "wb") as stream:
        stream.write(b"garbage")
    run_orphans_here(base)
    DeferredFunctionManager.cleanupWorker(base)
    assert state_files(base) == ["funcfifo", "funclink", "funcsetup.tmp"]
    assert target.read_bytes() == b"not a state file"


def test_importing_the_module_does_not_load_pickle(env):
    # (marshal and zlib are loaded by the interpreter itself.)
    result = run_python(
        """
import sys
import toilcoord.deferred
print("pickle" in sys.modules)
""",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# ------------------------------------------- planted files and directories


def test_a_symlinked_state_directory_is_refused_and_its_target_untouched(tmp_path):
    # The attack: <dir>/deferred -> a directory of someone else's (root's
    # python library, say); cleanup used to unlink every func* file there.
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    (victim / "functools.py").write_text("precious")
    (victim / "func-precious").write_bytes(b"precious")
    os.chmod(victim / "func-precious", 0o600)
    base = tmp_path / "work"
    base.mkdir()
    os.symlink(victim, base / "deferred")
    with pytest.raises(PermissionError, match="not a directory"):
        DeferredFunctionManager.cleanupWorker(base)
    with pytest.raises(PermissionError, match="not a directory"):
        DeferredFunctionManager(base)
    assert sorted(os.listdir(victim)) == ["func-precious", "functools.py"]
    assert (victim / "func-precious").read_bytes() == b"precious"


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_a_state_directory_others_can_write_is_refused(base, mode):
    os.mkdir(state_dir(base))
    os.chmod(state_dir(base), mode)
    with pytest.raises(PermissionError, match="writable by nobody else"):
        DeferredFunctionManager.cleanupWorker(base)
    with pytest.raises(PermissionError, match="writable by nobody else"):
        DeferredFunctionManager(base)
    assert stat.S_IMODE(os.stat(state_dir(base)).st_mode) == mode, "left as it was"


def test_a_hard_linked_state_file_is_neither_run_nor_deleted(base, out, env, children, caplog, dfhelpers):
    # A file of someone else's (root's, in an epilog) hard-linked into the
    # directory looks like ours by owner and mode: its link count gives it away.
    path, _ = orphan_with_records(children, env, base, out, 1)
    elsewhere = os.path.join(os.path.dirname(base), "elsewhere")
    os.link(path, elsewhere)
    caplog.set_level(logging.INFO)
    run_orphans_here(base)
    assert lines(out) == []
    assert os.path.exists(path) and os.path.exists(elsewhere)
    assert any("2 links" in error.getMessage() for error in errors(caplog))


def test_a_fifo_named_like_a_state_file_never_hangs_the_scan(base):
    DeferredFunctionManager(base).close()
    fifo = os.path.join(state_dir(base), DeferredFunctionManager.PREFIX + "fifo")
    os.mkfifo(fifo, 0o600)
    run_orphans_here(base)  # the test's timeout is the hang detector
    DeferredFunctionManager.cleanupWorker(base)
    assert state_files(base) == [os.path.basename(fifo)], "skipped, left alone"


def test_a_state_file_gone_stale_while_being_opened_is_replaced_without_leaking(base, monkeypatch):
    # On NFS (seen on the rig) the fresh state file can be removed on the
    # server between its creation and its second open: ESTALE, which cannot
    # be caused here. The manager makes another; no fd is left open.
    import toilcoord.deferred as deferred_module

    real_open, real_fstat, writers, failed = os.open, os.fstat, [], []

    def noting_writers(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        if flags & os.O_ACCMODE == os.O_WRONLY:
            writers.append(fd)
        return fd

    def stale_on_the_second_open(fd):
        if fd in writers and not failed:  # once: the number is reused after
            failed.append(fd)
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
        return real_fstat(fd)

    before = open_fds()
    monkeypatch.setattr(deferred_module.os, "open", noting_writers)
    monkeypatch.setattr(deferred_module.os, "fstat", stale_on_the_second_open)
    manager = DeferredFunctionManager(base)
    monkeypatch.undo()
    assert len(writers) == 2, "a second state file was made"
    manager.close()
    assert open_fds() == before


# ------------------------------------------------ fuzz: deferred state files


def ran(path):
    try:
        with open(path) as stream:
            tags = stream.read().split()
    except FileNotFoundError:
        return []
    os.unlink(path)
    return tags


@pytest.fixture
def inside_tmp_path(tmp_path, monkeypatch):
    # A fuzzed record with a valid checksum may run record() with shuffled
    # arguments, a tag for a path: let relative paths land here.
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def state_file(tmp_path_factory):
    """A real state file of four records, and where each record ends."""
    base = tmp_path_factory.mktemp("source")
    runs = str(base / "runs")
    with DeferredFunctionManager(base) as manager:
        with manager.open() as defer:
            ends = []
            for tag in ("first", "second", "third", "fourth"):
                defer(record, runs, tag)
                ends.append(os.path.getsize(manager.stateFileName))
            with open(manager.stateFileName, "rb") as stream:
                data = stream.read()
    ran(runs)
    return data, ends, runs


def run_as_orphan(base, data, mode=0o600, owner=None):
    """Leave *data* as a dead process's state file and run cleanupWorker."""
    state_dir = base / "deferred"
    state_dir.mkdir(mode=0o700, exist_ok=True)
    path = state_dir / ("func" + os.urandom(4).hex())
    path.write_bytes(data)
    os.chmod(path, mode)
    if owner is not None:
        os.chown(path, owner, -1)
    DeferredFunctionManager.cleanupWorker(base)
    return path


def removed_unless_not_ours(base, path, data):
    """A file that does not begin with a record is never deleted; clear it
    away for the next round."""
    from toilcoord.deferred_records import starts_with_a_record

    if starts_with_a_record(data):
        assert not (base / "deferred").exists()
    else:
        path.unlink()  # FileNotFoundError if it was deleted
        (base / "deferred").rmdir()


TAGS = ["first", "second", "third", "fourth"]


@pytest.mark.usefixtures("inside_tmp_path")
def test_a_state_file_cut_at_every_offset_runs_exactly_its_whole_records(tmp_path, state_file, caplog):
    data, ends, runs = state_file
    caplog.set_level(logging.CRITICAL, logger="toilcoord.deferred")  # one error per torn tail
    for offset in range(len(data) + 1):
        run_as_orphan(tmp_path, data[:offset])
        expected = [tag for tag, end in zip(TAGS, ends) if end <= offset]
        assert ran(runs) == expected, "cut at offset %d" % offset
        assert not (tmp_path / "deferred").exists(), "a torn record is still ours to remove"


def flip_bytes(rng, data, count, ends, fix_crc):
    """Change *count* random bytes; return the data, the records left intact
    that come before any damaged header (records are read only at frame
    boundaries: nothing after a header that cannot be trusted runs)."""
    import struct
    import zlib

    data = bytearray(data)
    starts = [0] + ends[:-1]
    touched, headers = set(), set()
    for _ in range(count):
        where = rng.randrange(len(data))
        data[where] = (data[where] + rng.randrange(1, 256)) % 256
        touched.update(index for index, (start, end) in enumerate(zip(starts, ends)) if start <= where < end)
        headers.update(index for index, start in enumerate(starts) if start <= where < start + 12)
    if fix_crc:  # valid frames around mutated pickles: exercises the decoder
        for index in touched:
            start, end = starts[index], ends[index]
            length = struct.unpack_from("<I", data, start + 4)[0]
            if start + 12 + length == end:
                struct.pack_into("<I", data, start + 8, zlib.crc32(bytes(data[start + 12 : end])))
    readable = min(headers, default=len(TAGS))
    return bytes(data), [tag for index, tag in enumerate(TAGS) if index not in touched and index < readable]


def fuzz_corrupt_state_files(tmp_path, state_file, rounds):
    data, ends, runs = state_file
    rng = rng_for("state-bytes")
    for round_ in range(rounds):
        fix_crc = round_ % 2 == 1
        corrupt, intact = flip_bytes(rng, data, rng.randint(1, 3), ends, fix_crc)
        path = run_as_orphan(tmp_path, corrupt)
        done = ran(runs)
        context = "round %d (seed %d)" % (round_, SEED)
        assert [tag for tag in done if tag in intact] == intact, context
        if not fix_crc:  # without a valid checksum nothing else can run, nor anything twice
            # (with one, a mutated pickle may record anything, newlines too)
            assert len(done) <= len(TAGS), context
            assert sorted(set(done)) == sorted(done) and set(done) <= set(TAGS), context
        removed_unless_not_ours(tmp_path, path, corrupt)


@pytest.mark.parametrize("rounds", sizes(120, 5000))
@pytest.mark.usefixtures("inside_tmp_path")
def test_corrupt_state_files_never_crash_and_intact_records_run_once(tmp_path, state_file, caplog, rounds):
    caplog.set_level(logging.CRITICAL)
    fuzz_corrupt_state_files(tmp_path, state_file, rounds=rounds)


def fuzz_garbage_state_files(tmp_path, state_file, rounds):
    data, ends, runs = state_file
    rng = rng_for("state-garbage")
    records = [data[start:end] for start, end in zip([0] + ends[:-1], ends)]
    for round_ in range(rounds):
        kept = sorted(rng.sample(range(4), rng.randint(0, 4)))
        garbage = [random_bytes(rng, rng.randrange(0, 300) if rng.random() < 0.7 else 0)]
        pieces, expected = [garbage[0]], []
        for index in kept:
            pieces.append(records[index])
            if not any(garbage):  # only what is framed from offset 0 runs
                expected.append(TAGS[index])
            garbage.append(random_bytes(rng, rng.randrange(0, 40)))
            pieces.append(garbage[-1])
        data = b"".join(pieces)
        path = run_as_orphan(tmp_path, data)
        assert ran(runs) == expected, "round %d (seed %d)" % (round_, SEED)
        removed_unless_not_ours(tmp_path, path, data)


@pytest.mark.parametrize("rounds", sizes(60, 3000))
@pytest.mark.usefixtures("inside_tmp_path")
def test_garbage_before_or_between_records_stops_the_reading(tmp_path, state_file, caplog, rounds):
    caplog.set_level(logging.CRITICAL)
    fuzz_garbage_state_files(tmp_path, state_file, rounds=rounds)


def trusted_and_usable(mode, owner):
    if owner != os.geteuid() or mode & 0o022:
        return False
    return os.geteuid() == 0 or mode & 0o600 == 0o600


def fuzz_owners_and_modes(tmp_path, state_file, modes):
    data, _, runs = state_file
    owners = [os.geteuid()] + ([4242] if os.geteuid() == 0 else [])
    for mode in modes:
        for owner in owners:
            path = run_as_orphan(tmp_path, data, mode=mode, owner=owner if owner != os.geteuid() else None)
            context = "mode %o, owner %d" % (mode, owner)
            if trusted_and_usable(mode, owner):
                assert ran(runs) == TAGS and not path.exists(), context
            else:
                assert ran(runs) == [], context
                os.chmod(path, 0o600)
                assert path.read_bytes() == data, "an untrusted file is left alone: " + context
                path.unlink()


@pytest.mark.usefixtures("inside_tmp_path")
def test_state_files_of_wrong_owners_or_modes_are_never_run(tmp_path, state_file, caplog):
    caplog.set_level(logging.CRITICAL)
    fuzz_owners_and_modes(tmp_path, state_file, rng_for("modes").sample(range(0o1000), 24) + [0o600, 0o620, 0o602])


@pytest.mark.slow
@pytest.mark.usefixtures("inside_tmp_path")
def test_state_files_of_every_mode_and_a_wrong_owner(tmp_path, state_file, caplog):
    caplog.set_level(logging.CRITICAL)
    fuzz_owners_and_modes(tmp_path, state_file, range(0o1000))
