"""The loader: YAML + pydantic -> a model, or every problem as
`file:line: path: message`.  Tables of bad files with the exact lines
expected, then good files."""

from __future__ import annotations

import textwrap

import pytest
from pydantic import BaseModel, ConfigDict

from proxy.core.faults import FAULT_TYPES
from proxy.core.faults.drop import DropFault
from proxy.core.model import Match, Scenario
from proxy.errors import InvalidFile
from proxy.loader import (
    format_duration,
    load_model,
    load_scenario,
    load_scenario_text,
    main_schema,
    main_validate,
    scenario_schema,
    validate_paths,
)


def scenario(rules: str, duration: str = "5m") -> str:
    """A one-phase scenario around `rules` (YAML of the rule list, indented
    by the caller).  The rule list starts on line 6."""
    return (
        "name: t\n"
        "phases:\n"
        "  - name: p\n"
        f"    duration: {duration}\n"
        "    rules:\n"
        + textwrap.indent(textwrap.dedent(rules), "      ")
    )


def problems(text: str, file: str = "x.yaml") -> list[str]:
    with pytest.raises(InvalidFile) as info:
        load_scenario_text(text, file)
    return [p.render() for p in info.value.problems]


BAD = [
    (
        "unknown fault, did you mean",
        scenario("""\
            - fault:
                type: nxdomian
        """),
        ["x.yaml:7: phases[0].rules[0].fault.type: unknown fault 'nxdomian' "
         "(did you mean 'nxdomain'?)"],
    ),
    (
        "unknown fault, short form, nothing close: list the valid ones",
        scenario("- fault: boom\n"),
        ["x.yaml:6: phases[0].rules[0].fault: unknown fault 'boom' (valid faults: "
         + ", ".join(FAULT_TYPES) + ")"],
    ),
    (
        "bad CIDR",
        scenario("""\
            - match:
                clients: [10.0.0.0/8, 10.0.0.300/8]
              fault: drop
        """),
        ["x.yaml:7: phases[0].rules[0].match.clients[1]: invalid CIDR '10.0.0.300/8'"],
    ),
    (
        "bad regex",
        scenario("""\
            - match: {regex: "(unclosed"}
              fault: drop
        """),
        ["x.yaml:6: phases[0].rules[0].match.regex: invalid regex '(unclosed': "
         "missing ), unterminated subpattern at position 0"],
    ),
    (
        "probability out of range",
        scenario("""\
            - match:
                probability: 1.5
              fault: drop
        """),
        ["x.yaml:7: phases[0].rules[0].match.probability: must be at most 1, got 1.5"],
    ),
    (
        "probability ramp out of range and incomplete",
        scenario("""\
            - match:
                probability:
                  from: -0.5
              fault: drop
        """),
        ["x.yaml:7: phases[0].rules[0].match.probability: missing required key 'to'",
         "x.yaml:8: phases[0].rules[0].match.probability.from: must be at least 0, got -0.5"],
    ),
    (
        "probability not a number",
        scenario("""\
            - match: {probability: half}
              fault: drop
        """),
        ["x.yaml:6: phases[0].rules[0].match.probability: must be a valid number, got 'half'"],
    ),
    (
        "negative duration",
        scenario("[]\n", duration="-5m"),
        ["x.yaml:4: phases[0].duration: duration must not be negative, got '-5m'"],
    ),
    (
        "bad duration unit",
        scenario("[]\n", duration="5 minutes"),
        ["x.yaml:4: phases[0].duration: invalid duration '5 minutes': write e.g. "
         "'150ms', '30s', '5m', '2h'"],
    ),
    (
        "unknown key, did you mean",
        scenario("""\
            - match:
                sufix: example.com
              fault: drop
        """),
        ["x.yaml:7: phases[0].rules[0].match.sufix: unknown key 'sufix' (did you mean 'suffix'?)"],
    ),
    (
        "unknown key inside a fault, nothing close: list the valid ones",
        scenario("""\
            - fault:
                type: nxdomain
                soa: {zone: example.com, colour: red}
        """),
        ["x.yaml:8: phases[0].rules[0].fault.soa.colour: unknown key 'colour' "
         "(valid keys: zone, negative_ttl, mname, rname, serial)"],
    ),
    (
        "unknown key under an alias (`not`)",
        scenario("""\
            - match:
                not: {qtyp: A}
              fault: drop
        """),
        ["x.yaml:7: phases[0].rules[0].match.not.qtyp: unknown key 'qtyp' (did you mean 'qtype'?)"],
    ),
    (
        "bad rcode",
        scenario("""\
            - fault:
                type: rcode
                rcode: NXDOMIAN
        """),
        ["x.yaml:8: phases[0].rules[0].fault.rcode: unknown rcode 'NXDOMIAN'"],
    ),
    (
        "rcode out of range",
        scenario("- fault: {type: rcode, rcode: 5000}\n"),
        ["x.yaml:6: phases[0].rules[0].fault.rcode: rcode 5000 out of range 0-4095"],
    ),
    (
        "bad qtype",
        scenario("""\
            - match:
                qtype: [A, AAA]
              fault: drop
        """),
        ["x.yaml:7: phases[0].rules[0].match.qtype: unknown query type 'AAA'"],
    ),
    (
        "missing required key in a fault",
        scenario("- fault: {type: delay, jitter: 1s}\n"),
        ["x.yaml:6: phases[0].rules[0].fault: missing required key 'delay'"],
    ),
    (
        "fault without a type",
        scenario("- fault: {rcode: 2}\n"),
        ["x.yaml:6: phases[0].rules[0].fault: missing required key 'type' (one of: "
         + ", ".join(sorted(FAULT_TYPES)) + ")"],
    ),
    (
        "nested fault (delay then)",
        scenario("- fault: {type: delay, delay: 1s, then: {type: servfial}}\n"),
        ["x.yaml:6: phases[0].rules[0].fault.then.type: unknown fault 'servfial' "
         "(did you mean 'servfail'?)"],
    ),
    (
        "literal choice",
        scenario("- match: {transport: quic}\n  fault: drop\n"),
        ["x.yaml:6: phases[0].rules[0].match.transport: must be 'udp' or 'tcp', got 'quic'"],
    ),
    (
        "model-level check (ttl needs exactly one mode)",
        scenario("- fault: {type: ttl, set: 5, max: 10}\n"),
        ["x.yaml:6: phases[0].rules[0].fault: give exactly one of: set, min/max, scale"],
    ),
    (
        "bad spoofed address",
        scenario("- fault: {type: spoof, a: 1.2.3}\n"),
        ["x.yaml:6: phases[0].rules[0].fault.a: expected 4 octets in '1.2.3'"],
    ),
    (
        "scenario name, empty phases, top-level unknown key",
        "name: my scenario\nphases: []\nphase: {}\n",
        ["x.yaml:1: name: 'my scenario' does not match the pattern ^[A-Za-z0-9][A-Za-z0-9_.-]*$",
         "x.yaml:2: phases: must have at least 1 item",
         "x.yaml:3: phase: unknown key 'phase' (did you mean 'phases'?)"],
    ),
    (
        "missing top-level keys",
        "description: nothing else\n",
        ["x.yaml:1: missing required key 'name'", "x.yaml:1: missing required key 'phases'"],
    ),
    (
        "a rule that is not a mapping",
        scenario("- [drop]\n"),
        ["x.yaml:6: phases[0].rules[0]: must be a mapping (key: value), got ['drop']"],
    ),
    (
        "YAML syntax error",
        "name: t\nphases:\n  - name: p\n   duration: 5m\n",
        ["x.yaml:4: YAML syntax error: expected <block end>, but found '<block mapping start>' "
         "(while parsing a block collection started on line 3); check the indentation"],
    ),
    (
        "YAML tab indentation",
        "name: t\nphases:\n\t- name: p\n",
        ["x.yaml:3: YAML syntax error: found character '\\t' that cannot start any token "
         "(while scanning for the next token); indent with spaces, not tabs"],
    ),
    (
        "duplicate key",
        scenario("""\
            - match: {suffix: a.example}
              fault: drop
              match: {suffix: b.example}
        """),
        ["x.yaml:8: phases[0].rules[0].match: duplicate key 'match' (first on line 6); "
         "YAML would keep only the last"],
    ),
    (
        "empty file",
        "",
        ["x.yaml: the file is empty: expected a YAML mapping (key: value)"],
    ),
    (
        "only comments",
        "# nothing yet\n",
        ["x.yaml: the file is empty: expected a YAML mapping (key: value)"],
    ),
    (
        "not a mapping",
        "- name: t\n",
        ["x.yaml:1: expected a YAML mapping (key: value) at the top, not a list"],
    ),
    (
        "a single value",
        "just text\n",
        ["x.yaml:1: expected a YAML mapping (key: value) at the top, not a single value"],
    ),
]


@pytest.mark.parametrize("text, expected", [(t, e) for _, t, e in BAD], ids=[i for i, _, _ in BAD])
def test_bad_file(text: str, expected: list[str]) -> None:
    assert problems(text) == expected


def test_every_problem_is_reported_in_line_order() -> None:
    text = scenario("""\
        - match:
            sufix: example.com
            probability: 2
          fault: {type: nxdomian}
        - fault: {type: rcode, rcode: BOGUS}
    """, duration="-1s")
    assert problems(text, "scenarios/x.yaml") == [
        "scenarios/x.yaml:4: phases[0].duration: duration must not be negative, got '-1s'",
        "scenarios/x.yaml:7: phases[0].rules[0].match.sufix: unknown key 'sufix' "
        "(did you mean 'suffix'?)",
        "scenarios/x.yaml:8: phases[0].rules[0].match.probability: must be at most 1, got 2",
        "scenarios/x.yaml:9: phases[0].rules[0].fault.type: unknown fault 'nxdomian' "
        "(did you mean 'nxdomain'?)",
        "scenarios/x.yaml:10: phases[0].rules[1].fault.rcode: unknown rcode 'BOGUS'",
    ]


def test_second_phase_paths_and_lines() -> None:
    text = textwrap.dedent("""\
        name: two
        phases:
          - name: first
            duration: 1m
          - name: second
            duration: 1m
            rules:
              - fault: drop
              - match: {suffix: example.com}
                fault:
                  type: nxdomian
    """)
    assert problems(text, "scenarios/x.yaml") == [
        "scenarios/x.yaml:11: phases[1].rules[1].fault.type: unknown fault 'nxdomian' "
        "(did you mean 'nxdomain'?)"
    ]


def test_duplicate_key_and_validation_errors_together() -> None:
    text = scenario("- fault: drop\n  fault: nxdomian\n")
    assert problems(text) == [
        "x.yaml:7: phases[0].rules[0].fault: duplicate key 'fault' (first on line 6); "
        "YAML would keep only the last",
        "x.yaml:7: phases[0].rules[0].fault: unknown fault 'nxdomian' (did you mean 'nxdomain'?)",
    ]


def test_invalid_file_message_holds_every_line() -> None:
    with pytest.raises(InvalidFile) as info:
        load_scenario_text(scenario("- fault: boom\n- fault: bang\n"))
    assert str(info.value).count("\n") == 1
    assert str(info.value).startswith("<api>:6: phases[0].rules[0].fault: unknown fault 'boom'")


# --- good files ------------------------------------------------------------


def test_good_file_loads() -> None:
    loaded = load_scenario_text(textwrap.dedent("""\
        name: good
        time_scale: 0.5
        seed: 7
        phases:
          - name: one
            duration: 1h
            rules:
              - match:
                  suffix: example.com
                  qtype: [A, 65]
                  probability: {from: 0, to: 1}
                  not: {clients: 10.0.0.1}
                fault:
                  type: delay
                  delay: 150ms
                  then: servfail
              - fault: {type: flap, period: 20s, fault: drop}
    """))
    assert loaded.name == "good" and loaded.seed == 7
    assert loaded.total_duration == 1800
    rule = loaded.phases[0].rules[0]
    assert rule.match.qtype == ["A", "65"]
    assert rule.match.not_ is not None and rule.match.not_.clients == ["10.0.0.1/32"]
    assert rule.fault.type == "delay" and rule.fault.delay == 0.15
    assert rule.fault.then is not None and rule.fault.then.type == "servfail"
    assert loaded.phases[0].rules[1].fault.period == 20.0


def test_anchors_and_merge_keys_work() -> None:
    loaded = load_scenario_text(textwrap.dedent("""\
        name: anchors
        phases:
          - name: one
            duration: 1m
            rules:
              - match: &zone {suffix: example.com}
                fault: servfail
              - match:
                  <<: *zone
                  qtype: A
                fault: drop
    """))
    assert loaded.phases[0].rules[1].match.suffix == ["example.com"]


def test_load_scenario_reads_a_file(tmp_path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(scenario("- fault: servfail\n"))
    assert load_scenario(path).phases[0].rules[0].fault.type == "servfail"
    assert load_scenario(str(path)).name == "t"


def test_load_scenario_missing_file(tmp_path) -> None:
    with pytest.raises(InvalidFile) as info:
        load_scenario(tmp_path / "nope.yaml")
    assert str(info.value) == f"{tmp_path / 'nope.yaml'}: no such file"


class Config(BaseModel):
    """A stand-in for the proxy's own config: the loader is generic."""

    model_config = ConfigDict(extra="forbid")
    listen: list[str]
    upstreams: list[str]
    timeout: float = 2.0


def test_load_model_is_generic() -> None:
    config = load_model("listen: [127.0.0.2:53]\nupstreams: [1.1.1.1]\n", "dnschaos.yaml", Config)
    assert config.upstreams == ["1.1.1.1"]
    with pytest.raises(InvalidFile) as info:
        load_model("listen: []\nupstream: [1.1.1.1]\ntimeout: soon\n", "dnschaos.yaml", Config)
    assert [p.render() for p in info.value.problems] == [
        "dnschaos.yaml:1: missing required key 'upstreams'",
        "dnschaos.yaml:2: upstream: unknown key 'upstream' (did you mean 'upstreams'?)",
        "dnschaos.yaml:3: timeout: must be a valid number, got 'soon'",
    ]
    assert isinstance(load_model("type: drop\n", "f", DropFault), DropFault)


# --- paths and the CLI bodies ---------------------------------------------


def test_validate_paths_expands_directories(tmp_path) -> None:
    (tmp_path / "a.yaml").write_text(scenario("- fault: drop\n"))
    (tmp_path / "b.yml").write_text(scenario("- fault: dorp\n"))
    (tmp_path / "notes.txt").write_text("not yaml: [")
    (tmp_path / "empty").mkdir()
    found = validate_paths([str(tmp_path), str(tmp_path / "empty"), str(tmp_path / "gone.yaml")])
    assert [p.render() for p in found] == [
        f"{tmp_path / 'b.yml'}:6: phases[0].rules[0].fault: unknown fault 'dorp' "
        "(did you mean 'drop'?)",
        f"{tmp_path / 'empty'}: no *.yaml or *.yml files in directory",
        f"{tmp_path / 'gone.yaml'}: no such file",
    ]
    assert validate_paths([str(tmp_path / "a.yaml")]) == []


def test_main_validate(tmp_path, capsys) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("name: g\ntime_scale: 0.1\nphases:\n"
                    "  - {name: a, duration: 157m, rules: [{match: all, fault: nodata}]}\n"
                    "  - {name: b, duration: 3m}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(scenario("- fault: dorp\n"))
    assert main_validate([str(good)]) == 0
    assert capsys.readouterr().out == f"OK {good} (2 phases, 1 rule, 16m at time_scale 0.1)\n"
    assert main_validate([str(good), str(bad)]) == 2
    out, err = capsys.readouterr()
    assert out == f"OK {good} (2 phases, 1 rule, 16m at time_scale 0.1)\n"
    assert err == (f"{bad}:6: phases[0].rules[0].fault: unknown fault 'dorp' "
                   "(did you mean 'drop'?)\n")
    assert main_validate([]) == 2
    assert "usage" in capsys.readouterr().err


def test_validate_warns_about_a_run_longer_than_max_run_duration(tmp_path, capsys) -> None:
    day = tmp_path / "day.yaml"
    day.write_text("name: day\nphases:\n  - {name: a, duration: 24h, "
                   "rules: [{match: {suffix: example.com}, fault: nxdomain}]}\n")
    assert main_validate([str(day)]) == 0  # valid: a warning, not an error
    out, err = capsys.readouterr()
    assert out == f"OK {day} (1 phase, 1 rule, 24h)\n"
    assert err == (f"{day}: warning: scenario day asks for 24h but max_run_duration is 4h: "
                   "it stops after 4h (unless the proxy runs with a larger max_run_duration)\n")
    assert main_validate([str(day)], max_run_duration=24 * 3600) == 0  # not cut: no warning
    assert capsys.readouterr().err == ""
    # The scenario's own max_duration is what a run asks for.
    day.write_text(day.read_text() + "max_duration: 3h\n")
    assert main_validate([str(day)]) == 0 and capsys.readouterr().err == ""


def test_validate_warns_about_a_rule_without_match(tmp_path, capsys) -> None:
    text = ("name: m\nphases:\n  - name: a\n    duration: 1m\n    rules:\n"
            "      - fault: drop\n      - {match: all, fault: drop}\n"
            "      - {match: {}, fault: drop}\n      - {match: {name: x.example}, fault: drop}\n")
    file = tmp_path / "m.yaml"
    file.write_text(text)
    assert main_validate([str(file)]) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"{file}:{line}: phases[0].rules[{i}]: warning: no match: this rule faults every query "
        "(write `match: all` if that is meant)" for line, i in ((6, 0), (8, 2))]
    rule = load_scenario_text(text).phases[0].rules[1]
    assert rule.match == Match()  # `match: all` is the empty match


def test_main_schema_prints_the_schema(capsys) -> None:
    import json

    assert main_schema() == 0
    assert json.loads(capsys.readouterr().out) == scenario_schema()


@pytest.mark.parametrize("seconds, text", [
    (0.15, "150ms"), (0, "0ms"), (30, "30s"), (300, "5m"), (3720, "1h 2m"), (52380, "14h 33m"),
    (3601, "1h 1s"),
])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_scenario_model_still_validates_directly() -> None:
    # The loader adds lines and wording, not rules: the model alone agrees.
    assert Scenario.model_validate({"name": "x", "phases": [{"name": "p", "duration": "1s"}]})


@pytest.mark.parametrize("word, value", [
    ("on", "true"), ("off", "false"), ("yes", "true"), ("no", "false"),
    ("true", "true"), ("False", "false"),
])
def test_yaml_boolean_in_a_string_field_says_to_quote_it(word: str, value: str) -> None:
    """YAML 1.1 reads `on`, `no`... as booleans: the problem names the file,
    the line, the field, and says to quote the word."""
    text = ("name: t\n"
            "phases:\n"
            f"  - name: {word}\n"
            "    duration: 5m\n"
            "    rules:\n"
            f"      - match: {{name: [a.test, {word}]}}\n"
            "        fault: nxdomain\n")
    hint = f"got the YAML boolean {value} (write '{word}' in quotes to mean the name)"
    assert problems(text, "gd.yaml") == [
        f"gd.yaml:3: phases[0].name: {hint}",
        f"gd.yaml:6: phases[0].rules[0].match.name[1]: {hint}",
    ]
    # Quoted, the word is the name.
    quoted = text.replace(f"name: {word}", f"name: '{word}'").replace(f", {word}]", f", '{word}']")
    assert load_scenario_text(quoted).phases[0].name == word


def test_yaml_boolean_in_another_string_field() -> None:
    text = "name: t\ndescription: yes\nphases: []\n"
    assert "x.yaml:2: description: got the YAML boolean true (write 'yes' in quotes to mean " \
           "the text)" in problems(text)
