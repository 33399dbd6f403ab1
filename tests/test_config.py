"""Configuration: defaults, conf.d merge order, --set overrides, and errors that say where."""
from __future__ import annotations

import json

import pytest

from conftest import GTUBE, check_json, make_message, run_filterd
from filterd import config as cfgmod


def test_every_core_setting_has_a_documented_default():
    text = run_filterd("config", "example").stdout.decode()
    schema = cfgmod.core_schema()
    for section, table in schema.defaults.items():
        assert f"[{section}]" in text
        for key in table:
            if key != "*":
                assert key in text, f"[{section}] {key} missing from the example config"
    # the example is itself a valid config
    assert cfgmod.tomllib.loads(text)


def test_conf_d_files_merge_in_name_order_and_set_wins(tmp_path):
    main = tmp_path / "filterd.toml"
    main.write_text('[actions]\nreject = 30.0\nquarantine = 20.0\n')
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "10-a.toml").write_text('[actions]\nreject = 40.0\n')
    (tmp_path / "conf.d" / "20-b.toml").write_text('[actions]\nreject = 50.0\n')
    proc = run_filterd("config", "show", "--config", str(main), "--set", "actions.quarantine=5")
    data = json.loads(proc.stdout)
    assert data["actions"]["reject"] == 50.0
    assert data["actions"]["quarantine"] == 5
    assert data["actions"]["add_header"] == 6.0  # untouched default


def test_config_check_reports_every_problem_with_file_line_and_key(tmp_path):
    main = tmp_path / "filterd.toml"
    main.write_text('[plugins]\ntimeout = "soon"\non_error = "explode"\n\n'
                    '[dns]\ncache_size = "big"\n'
                    'colour = "blue"\n')
    proc = run_filterd("config", "check", "--config", str(main))
    err = proc.stderr.decode()
    assert proc.returncode == 2
    assert (f'{main}:2: [plugins] timeout: expected a duration like "30s", "5m" or "5d", '
            "got 'soon'") in err
    assert f"{main}:3: [plugins] on_error: expected one of tempfail, skip, got 'explode'" in err
    assert f"{main}:6: [dns] cache_size: expected an integer, got 'big'" in err
    assert f"{main}:7: [dns] colour: unknown setting" in err
    assert "4 problem(s) found" in err


def test_invalid_toml_names_the_line(tmp_path):
    main = tmp_path / "filterd.toml"
    main.write_text('[actions]\nreject = = 3\n')
    proc = run_filterd("config", "check", "--config", str(main))
    assert proc.returncode == 2
    assert f"{main}:2: not valid TOML" in proc.stderr.decode()


def test_a_bad_config_stops_filterd_check_with_the_same_message(tmp_path):
    proc = run_filterd("check", "--set", "actions.reject=lots", "-", input=make_message())
    assert proc.returncode == 2
    assert b"--set: [actions] reject: expected a number, got 'lots'" in proc.stderr


def test_missing_config_file_is_reported(tmp_path):
    proc = run_filterd("config", "check", "--config", str(tmp_path / "nope.toml"))
    assert proc.returncode == 2 and b"config file does not exist" in proc.stderr


def test_rule_file_errors_name_file_rule_and_key(tmp_path):
    rules = tmp_path / "rules.d"
    rules.mkdir()
    (rules / "bad.toml").write_text('''
[[rule]]
name = "BROKEN_REGEX"
score = 1.0
body = 'unclosed ( group'

[[rule]]
name = "TYPO_KEY"
score = 1.0
bodyy = 'x'

[[rule]]
name = "META_MISSING"
all = ["NO_SUCH_RULE"]
''')
    site = f"rules.site_dir={rules}"
    proc = run_filterd("config", "check", "--set", site)
    err = proc.stderr.decode()
    assert proc.returncode == 2
    assert f"{rules / 'bad.toml'}:3: [rule BROKEN_REGEX] body: bad regular expression" in err
    assert "[rule TYPO_KEY] bodyy: unknown rule key" in err
    assert "[rule META_MISSING]: refers to unknown rule 'NO_SUCH_RULE'" in err
    # a scan with broken rules refuses to run rather than silently skipping them
    proc = run_filterd("check", "--set", site, "-", input=make_message())
    assert proc.returncode == 1
    assert b"plugin rules failed to start" in proc.stderr and b"BROKEN_REGEX" in proc.stderr


def test_site_rules_override_shipped_rules_and_scores(tmp_path):
    rules = tmp_path / "rules.d"
    rules.mkdir()
    (rules / "site.toml").write_text('''
[[rule]]
name = "GTUBE"
enabled = false
rawbody = 'x'

[scores]
MISSING_DATE = 4.0
''')
    msg = b"Subject: hi\r\n\r\n" + GTUBE.encode() + b"\r\n"
    rc, out = check_json(msg, "--rcpt", "a@example.org", "--set", f"rules.site_dir={rules}")
    names = {s["name"]: s["score"] for s in out["symbols"]}
    assert "GTUBE" not in names
    assert names["MISSING_DATE"] == 4.0
    # the config's [scores] wins over rule files
    rc, out = check_json(msg, "--rcpt", "a@example.org", "--set", f"rules.site_dir={rules}",
                         "--set", "scores.MISSING_DATE=0.1")
    assert {s["name"]: s["score"] for s in out["symbols"]}["MISSING_DATE"] == 0.1


@pytest.mark.parametrize("text,seconds", [("250ms", 0.25), ("10s", 10), ("5m", 300), ("2h", 7200),
                                          ("5d", 432000), ("1w", 604800), (30, 30.0)])
def test_durations(text, seconds):
    assert cfgmod.parse_duration(text) == seconds


@pytest.mark.parametrize("text,size", [("512K", 524288), ("10M", 10485760), ("1G", 1073741824),
                                       ("10MB", 10485760), (1000, 1000)])
def test_sizes(text, size):
    assert cfgmod.parse_size(text) == size
