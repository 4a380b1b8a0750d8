"""Experiment definitions: the committed studies parse, bad ones are refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from workbench.errors import DefinitionError
from workbench.experiments.definition import load_definition, parse_definition
from workbench.experiments.runner import plan

STUDIES = sorted((Path(__file__).parents[2] / "experiments").glob("*.toml"))

GOOD = {
    "name": "t",
    "workloads": ["standin-busybox"],
    "systems": ["tgz-overlayfs", "lazy"],
    "networks": ["cloud-vm", "none"],
    "repetitions": 3,
    "quick": {"repetitions": 1, "networks": ["none"]},
}


def test_every_committed_study_parses_full_and_quick() -> None:
    assert len(STUDIES) >= 5
    for path in STUDIES:
        full = load_definition(path)
        quick = load_definition(path, quick=True)
        assert full.name == path.stem
        assert quick.quick and not full.quick
        assert len(plan(quick)) <= len(plan(full))


def test_quick_table_overrides_only_under_quick() -> None:
    full = parse_definition(GOOD, "t.toml")
    quick = parse_definition(GOOD, "t.toml", quick=True)
    assert (full.repetitions, full.networks) == (3, ("cloud-vm", "none"))
    assert (quick.repetitions, quick.networks) == (1, ("none",))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "red"}, r"unknown key colour; known keys: .*workloads"),
        ({"systems": ["tgz-overlayfs", "docker"]}, r"unknown system .*'docker'.*lazy"),
        ({"networks": ["moon"]}, r"unknown network preset 'moon'; choose one of none, datacenter"),
        ({"disks": ["floppy"]}, r"unknown disk preset 'floppy'; choose one of local, cloud-disk"),
        ({"cache": ["lukewarm"]}, r"unknown cache state 'lukewarm'"),
        ({"order": "random"}, r"unknown order 'random'; choose one of interleaved"),
        ({"repetitions": 0}, r"repetitions must be at least 1, got 0"),
        ({"repetitions": "5"}, r"repetitions must be int, got '5'"),
        ({"repetitions": True}, r"repetitions must be int, got True"),
        ({"workloads": []}, r"workloads must be a non-empty list of names"),
        ({"systems": ["lazy", "lazy"]}, r"systems names an entry twice"),
        ({"quick": {"repetition": 1}}, r"unknown key quick.repetition"),
        ({"kind": "device", "systems": ["tgz-overlayfs"]}, r"for kind device.*plain-loop"),
        ({"device": {"queue_depths": [0]}}, r"device.queue_depths must be integers from 1"),
        ({"device": {"walks": ["ls"]}}, r"unknown device.walks \['ls'\]; choose from du, tar"),
        ({"timeout_s": -1}, r"timeout_s must be > 0"),
    ],
)
def test_bad_definitions_are_refused_with_the_cause(change: dict, message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        parse_definition({**GOOD, **change}, "bad.toml")


def test_a_definition_needs_a_name() -> None:
    document = {key: value for key, value in GOOD.items() if key != "name"}
    with pytest.raises(DefinitionError, match=r"bad.toml: the definition has no name"):
        parse_definition(document, "bad.toml")


def test_unreadable_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(DefinitionError, match=r"no such experiment definition"):
        load_definition(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("name = [unclosed\n")
    with pytest.raises(DefinitionError, match=r"broken.toml: not valid TOML"):
        load_definition(broken)


def test_plan_orders() -> None:
    definition = parse_definition(GOOD, "t.toml")
    combinations = 2 * 2  # systems x networks
    for order in ("interleaved", "blocked", "shuffled"):
        trials = plan(parse_definition({**GOOD, "order": order}, "t.toml"))
        assert len(trials) == combinations * definition.repetitions
        assert len({trial.key for trial in trials}) == len(trials)

    interleaved = plan(parse_definition({**GOOD, "order": "interleaved"}, "t.toml"))
    assert [trial.repetition for trial in interleaved[:combinations]] == [0] * combinations
    # each repetition starts one combination further on
    assert interleaved[combinations].system != interleaved[0].system or (
        interleaved[combinations].network != interleaved[0].network
    )
    blocked = plan(parse_definition({**GOOD, "order": "blocked"}, "t.toml"))
    assert [trial.repetition for trial in blocked[:3]] == [0, 1, 2]
    shuffled = plan(parse_definition({**GOOD, "order": "shuffled", "seed": 3}, "t.toml"))
    again = plan(parse_definition({**GOOD, "order": "shuffled", "seed": 3}, "t.toml"))
    assert shuffled == again


def test_device_and_sizes_plans() -> None:
    device = parse_definition(
        {
            "name": "d",
            "kind": "device",
            "systems": ["plain-loop", "lazy-warm"],
            "repetitions": 1,
            "device": {"queue_depths": [1, 32], "walks": ["du"]},
        },
        "d.toml",
    )
    tests = sorted({(trial.test, trial.queue_depth) for trial in plan(device)})
    assert tests == [("du", 0), ("randread-8k", 1), ("randread-8k", 32)]
    sizes = parse_definition({"name": "s", "kind": "sizes", "repetitions": 1}, "s.toml")
    assert sorted(trial.format for trial in plan(sizes)) == ["lsmt", "tar", "tar.gz", "zfile"]
