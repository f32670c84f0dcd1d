"""iotplat.spec.registry edits a device registry in its own format: CSV by header (rows found by the `id` column,
every other line byte for byte), YAML 1.2 round trip with comments kept and values quoted where a YAML 1.1
reader would change them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from iotplat.errors import InvalidInput
from iotplat.spec.devices import load_registry
from iotplat.spec.registry import add_device, remove_device

CSV = Path("devices.csv")
YML = Path("devices.yaml")


def _devices(path: Path, text: str, tmp_path: Path) -> list[tuple[str, dict[str, str]]]:
    f = tmp_path / path.name
    f.write_bytes(text.encode())
    devices, problems = load_registry(f, path.name)
    assert not problems, problems
    return [(d.id, dict(d.attributes)) for d in devices]


def test_csv_rows_are_found_by_the_id_column_not_the_first(tmp_path: Path) -> None:
    text = "# sites first\nsite,id\ndev-x,dev-1\nsouth,dev-x\nnorth,dev-2\n"
    out = remove_device(CSV, text, "dev-x")
    assert out == "# sites first\nsite,id\ndev-x,dev-1\nnorth,dev-2\n"  # the row whose *id* is dev-x
    assert _devices(CSV, out, tmp_path) == [("dev-1", {"site": "dev-x"}), ("dev-2", {"site": "north"})]
    with pytest.raises(InvalidInput, match="no device 'site'"):
        remove_device(CSV, text, "site")  # the header is not a row
    with pytest.raises(InvalidInput, match="no device 'north'"):
        remove_device(CSV, text, "north")  # an attribute value is not an id


def test_csv_edits_keep_every_other_line_byte_for_byte(tmp_path: Path) -> None:
    text = ('# comment, with "quotes"\r\n\r\nid , site\r\n"a-1",north\r\n# a-2 is on the roof\r\na-2,  south\r\n'
            "a-3,east")
    out = remove_device(CSV, text, "a-2")
    assert out == '# comment, with "quotes"\r\n\r\nid , site\r\n"a-1",north\r\n# a-2 is on the roof\r\na-3,east'
    out = add_device(CSV, out, "a-4", {"site": "west"})
    assert out.endswith("\r\na-3,east\r\na-4,west\r\n")  # the last line gets its line end, the new row the file's
    assert out.startswith('# comment, with "quotes"\r\n\r\nid , site\r\n"a-1",north\r\n')
    assert [d for d, _ in _devices(CSV, out, tmp_path)] == ["a-1", "a-3", "a-4"]
    out = remove_device(CSV, out, "a-1")  # a quoted cell
    assert [d for d, _ in _devices(CSV, out, tmp_path)] == ["a-3", "a-4"]


def test_csv_add_follows_the_header_order_and_refuses_unknown_columns_and_taken_ids() -> None:
    text = "site,id,floor\nnorth,d-1,2\n"
    assert add_device(CSV, text, "d-2", {"floor": "3", "site": "east"}) == text + "east,d-2,3\n"
    assert add_device(CSV, text, "d-3", {}) == text + ",d-3,\n"
    with pytest.raises(InvalidInput, match="no column 'room'"):
        add_device(CSV, text, "d-2", {"room": "1"})
    with pytest.raises(InvalidInput, match="already registered"):
        add_device(CSV, text, "d-1", {})


@pytest.mark.parametrize("name", ["Site", "site\n", "a b", "id", "x" * 33, "", "1abc", "sité"])
def test_attribute_names_are_checked(name: str) -> None:
    with pytest.raises(InvalidInput, match="not an attribute name"):
        add_device(YML, "devices:\n  - {id: a}\n", "b", {name: "x"})


@pytest.mark.parametrize("value", ["", "x\n", "a b", "x" * 65, "a,b", "{x}", "#x", "é"])
def test_attribute_values_are_checked(value: str) -> None:
    with pytest.raises(InvalidInput, match="1-64 letters"):
        add_device(CSV, "id,site\n", "b", {"site": value})


@pytest.mark.parametrize("dev", ["sensor-1\n", "a b", "", "x" * 65, "iotplat-x", "a/b", "a\x00"])
def test_device_ids_are_checked(dev: str) -> None:
    with pytest.raises(InvalidInput):
        add_device(CSV, "id\n", dev, {})


YAML_TEXT = """\
# Campus devices: one entry per room. Reviewed like code.
devices:
  # main building
  - {id: room-101, building: main}   # by the stairs
  - {id: "on", building: '1.2'}
  # science wing
  - id: lab-3
    # measured weekly
    building: science
  -
    id: lab-5
    building: "yes"
  - {id: lab-4,
     building: science}
# end of list
"""


def test_yaml_remove_keeps_comments_quotes_and_other_entries(tmp_path: Path) -> None:
    for dev, gone in (("room-101", "room-101"), ("on", '"on"'), ("lab-3", "lab-3"), ("lab-5", "lab-5"),
                      ("lab-4", "lab-4")):
        out = remove_device(YML, YAML_TEXT, dev)
        assert gone not in out
        for comment in ("# Campus devices", "# main building", "# science wing", "# end of list"):
            assert comment in out, (dev, out)
        left = [d for d, _ in _devices(YML, out, tmp_path)]
        assert left == [d for d in ("room-101", "on", "lab-3", "lab-5", "lab-4") if d != dev]
        # a YAML 1.1 reader (PyYAML) reads the same strings: `on`, `1.2` and `yes` stay quoted
        assert yaml.safe_load(out) == {"devices": [
            {"id": d, "building": b} for d, b in (("room-101", "main"), ("on", "1.2"), ("lab-3", "science"),
                                                  ("lab-5", "yes"), ("lab-4", "science")) if d != dev]}
    # removing one entry deletes only its lines
    assert remove_device(YML, YAML_TEXT, "on") == YAML_TEXT.replace("  - {id: \"on\", building: '1.2'}\n", "")
    assert "measured weekly" not in remove_device(YML, YAML_TEXT, "lab-3")  # a comment inside the entry goes with it


@pytest.mark.parametrize("value", ["on", "off", "yes", "no", "y", "n", "true", "null", "1.2", "0o17", "0x1F",
                                   "12:30", "1:2:3", "1_000", "2020-01-01", "1e3", "08", ".inf", ":a", "-"])
def test_yaml_add_quotes_values_a_yaml_1_1_or_1_2_reader_would_change(value: str, tmp_path: Path) -> None:
    out = add_device(YML, YAML_TEXT, "new-1", {"building": value})
    assert yaml.safe_load(out)["devices"][-1] == {"id": "new-1", "building": value}  # YAML 1.1
    assert _devices(YML, out, tmp_path)[-1] == ("new-1", {"building": value})  # iotplat's YAML 1.2 reader
    assert out.startswith(YAML_TEXT.removesuffix("# end of list\n"))  # appended after the last entry
    assert out.endswith("# end of list\n")


def test_yaml_add_writes_one_flow_line_with_the_list_indent(tmp_path: Path) -> None:
    out = add_device(YML, YAML_TEXT, "room-201", {"building": "annex"})
    assert "  - {id: room-201, building: annex}\n# end of list\n" in out
    out = add_device(YML, "devices:\n- {id: a}\n", "yes", {})  # an id that YAML 1.1 reads as true
    assert out == 'devices:\n- {id: a}\n- {id: "yes"}\n'
    assert yaml.safe_load(out) == {"devices": [{"id": "a"}, {"id": "yes"}]}


def test_yaml_document_markers_stay_where_they_are(tmp_path: Path) -> None:
    text = "---\ndevices:\n  - {id: a}\n  - {id: b}\n...\n"
    assert add_device(YML, text, "c", {}) == "---\ndevices:\n  - {id: a}\n  - {id: b}\n  - {id: c}\n...\n"
    assert remove_device(YML, text, "b") == "---\ndevices:\n  - {id: a}\n...\n"
    assert [d for d, _ in _devices(YML, add_device(YML, text, "c", {}), tmp_path)] == ["a", "b", "c"]


def test_yaml_empty_or_flow_lists_are_edited_by_round_trip(tmp_path: Path) -> None:
    out = add_device(YML, "# none yet\ndevices: []  # fill me\n", "d-1", {"site": "on"})
    assert out.startswith("# none yet\n") and yaml.safe_load(out) == {"devices": [{"id": "d-1", "site": "on"}]}
    assert _devices(YML, out, tmp_path) == [("d-1", {"site": "on"})]
    out = remove_device(YML, "# flow\ndevices: [{id: a}, {id: 'off'}, {id: b}]\n", "off")
    assert out.startswith("# flow\n") and yaml.safe_load(out) == {"devices": [{"id": "a"}, {"id": "b"}]}
    with pytest.raises(InvalidInput, match="already registered"):
        add_device(YML, YAML_TEXT, "on", {})
    with pytest.raises(InvalidInput, match="no device 'science'"):
        remove_device(YML, YAML_TEXT, "science")
