"""Fuzzing the cluster config loader: configs/test-small.yaml mutated (keys deleted, values of
the wrong type, negative and huge numbers, duplicate ids and ports, bad endpoints, unknown keys)
and broken as text (not YAML, empty, truncated, binary garbage, flipped bytes).

Every case must end in a ConfigError whose message names where (the key, or the file and line),
or in a valid config; never in a raw KeyError/TypeError/AttributeError. pico-check-config exits
1 with the message on a sample. Seeds are fixed; a failure prints the seed and the case."""
from __future__ import annotations

import copy
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shared.config import load_config, parse_config
from shared.config_check import main as check_main
from shared.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
BASE_TEXT = (REPO / "configs" / "test-small.yaml").read_text()
BASE = yaml.safe_load(BASE_TEXT)
SEED = 8008
ODD_VALUES = [None, "", "x", -1, 0, 2 ** 64, -2 ** 63, 1.5, float("nan"), True, [], {}, [1, 2],
              {"a": 1}, "tcp://", "\x00\x01", "9" * 40]
BAD_ENDPOINTS = ["", "tcp://", "tcp://127.0.0.1", "tcp://127.0.0.1:99999", "tcp://:7111",
                 "foo", "udp://127.0.0.1:7111", "ipc://", "tcp://127.0.0.1:-1", 7111]


def _paths(node, prefix=()):
    """Every key path of the tree (mappings only), interior nodes and leaves."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))


def _get_parent(tree, path):
    for k in path[:-1]:
        tree = tree[k]
    return tree


def _dump(tree) -> str:
    return yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)


def _check(text: str, case: str, names: tuple = ()) -> ConfigError | None:
    """parse_config(text): a config or a ConfigError naming one of `names` (if given)."""
    try:
        parse_config(text, "fuzz.yaml")
    except ConfigError as e:
        msg = str(e)
        assert msg.startswith("fuzz.yaml"), f"[seed {SEED}] {case}: error does not name the " \
            f"file: {msg}"
        if names:
            assert any(str(n) in msg for n in names), \
                f"[seed {SEED}] {case}: error names none of {names}: {msg}"
        return e
    except Exception as e:  # noqa: BLE001 - exactly what the fuzzer looks for
        pytest.fail(f"[seed {SEED}] {case}: raw {type(e).__name__}: {e}\n--- config ---\n{text}")
    return None


def test_base_config_is_valid():
    assert _check(BASE_TEXT, "base") is None


def test_every_key_deleted():
    n_err = 0
    for path in _paths(BASE):
        tree = copy.deepcopy(BASE)
        del _get_parent(tree, path)[path[-1]]
        # A required key is named as missing; an optional one is fine; a deleted replica or
        # group is named where it is referenced.
        if _check(_dump(tree), f"delete {'.'.join(map(str, path))}") is not None:
            n_err += 1
    assert n_err >= 5  # version, cluster, cluster.name, replicas, ids... are required


def test_every_value_replaced_by_odd_values():
    cases = errors = 0
    for path in _paths(BASE):
        for value in ODD_VALUES:
            tree = copy.deepcopy(BASE)
            _get_parent(tree, path)[path[-1]] = value
            case = f"{'.'.join(map(str, path))} = {value!r}"
            e = _check(_dump(tree), case)
            cases += 1
            if e is not None:
                errors += 1
                # The error is located: a key path or a line.
                assert e.key or e.line, f"[seed {SEED}] {case}: unlocated error: {e}"
    assert cases > 200 and errors > cases * 0.8


def test_duplicates_and_bad_endpoints_are_named():
    # (nfqueue may repeat: each replica binds its queue in its own host or namespace)
    for field in ("id", "smm_endpoint", "rm_endpoint", "pmm_endpoint"):
        tree = copy.deepcopy(BASE)
        tree["replicas"]["r2"][field] = tree["replicas"]["r1"][field]
        e = _check(_dump(tree), f"duplicate {field}", names=(field, "duplicate"))
        assert e is not None, f"duplicate {field} accepted"
    for ep in BAD_ENDPOINTS:
        tree = copy.deepcopy(BASE)
        tree["replicas"]["r1"]["smm_endpoint"] = ep
        e = _check(_dump(tree), f"smm_endpoint {ep!r}", names=("smm_endpoint",))
        assert e is not None, f"endpoint {ep!r} accepted"
    tree = copy.deepcopy(BASE)
    tree["groups"]["web"]["id"] = 0  # the default group's id
    assert _check(_dump(tree), "group id 0", names=("id",)) is not None
    # duplicate YAML keys in the text itself
    text = BASE_TEXT.replace("    id: 2\n", "    id: 2\n    id: 3\n")
    assert _check(text, "duplicate YAML key", names=("replicas.r2.id",)) is not None


def test_unknown_keys_are_refused_by_name():
    rng = random.Random(SEED)
    for path in _paths(BASE):
        parent_path = path[:-1]
        tree = copy.deepcopy(BASE)
        node = _get_parent(tree, path)
        if not isinstance(node, dict):
            continue
        bogus = f"bogus_{rng.randrange(1 << 20)}"
        node[bogus] = 1
        case = f"unknown key {bogus} under {'.'.join(map(str, parent_path)) or 'top'}"
        if parent_path[:1] in (("replicas",), ("groups",)) and len(parent_path) == 1:
            continue  # a new replica/group name: its own (missing keys) error, checked above
        assert _check(_dump(tree), case, names=(bogus,)) is not None, case


def test_broken_text():
    rng = random.Random(SEED)
    fixed = ["", " ", "\n\n", "---", "~", "null", "[]", "42", "'just a string'", "{{", ":::",
             "version: 1\ncluster: [\n", "\t\tversion: 1", "version: 1\n  cluster: x\n",
             "a: &x [*x]", "!!python/object:os.system {}", "version: !!binary AAAA",
             "? [a, b]\n: 1\n", "version: 1\nversion: 1\n", "\x00\x01\x02",
             "cluster: {name: " + "x" * 10000 + "}"]
    for text in fixed:
        assert _check(text, f"text {text[:40]!r}") is not None, f"{text[:40]!r} accepted"
    n = 0
    for i in range(600):  # truncated at random points, bytes flipped, lines dropped/shuffled
        lines = BASE_TEXT.splitlines(keepends=True)
        how = i % 4
        if how == 0:
            text = BASE_TEXT[:rng.randrange(len(BASE_TEXT))]
        elif how == 1:
            b = bytearray(BASE_TEXT.encode())
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(32, 127)
            text = b.decode("ascii", "replace")
        elif how == 2:
            del lines[rng.randrange(len(lines))]
            text = "".join(lines)
        else:
            j = rng.randrange(len(lines))
            lines.insert(rng.randrange(len(lines)), lines[j])
            text = "".join(lines)
        _check(text, f"text mutation {i} (kind {how})")
        n += 1
    assert n == 600


def test_binary_and_non_utf8_files(tmp_path):
    rng = random.Random(SEED)
    for i in range(50):
        p = tmp_path / f"garbage{i}.yaml"
        p.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))))
        try:
            load_config(p)
        except ConfigError as e:
            assert str(p) in str(e), f"[seed {SEED}] case {i}: the file is not named: {e}"
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"[seed {SEED}] garbage file {i}: raw {type(e).__name__}: {e}")
        else:
            pytest.fail(f"[seed {SEED}] garbage file {i} was accepted")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)  # a directory


def test_pico_check_config_exits_nonzero_with_a_message(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(BASE_TEXT)
    broken = []
    for i, text in enumerate(["", "{{", BASE_TEXT.replace("id: 2", "id: -2"),
                              BASE_TEXT.replace("capacity: 4096", "capacity: lots"),
                              BASE_TEXT.replace("target: r2", "target: r9")]):
        p = tmp_path / f"broken{i}.yaml"
        p.write_text(text)
        broken.append(p)
    assert check_main([str(good)]) == 0
    capsys.readouterr()
    for p in broken:
        assert check_main([str(good), str(p)]) == 1
        err = capsys.readouterr().err
        assert str(p) in err and err.strip(), err
    # the installed entry point, as an operator runs it
    r = subprocess.run([sys.executable, "-m", "shared.config_check", str(broken[3])],
                       capture_output=True, text=True, timeout=30, cwd=REPO)
    assert r.returncode == 1 and "capacity" in r.stderr and "Traceback" not in r.stderr
