"""Settings from the environment: the direct projector's priority and interval."""

from __future__ import annotations

from typing import Any

import pytest

from infra.settings import Settings


@pytest.mark.parametrize(("name", "field", "default", "highest"), [
    ("PROJECTOR_NICE", "projector_nice", 0, 19),
    ("PROJECTOR_INTERVAL_MS", "projector_interval_ms", 20, 1000),
])
def test_a_bounded_projector_setting_has_its_default_and_refuses_what_is_out_of_range(
        monkeypatch: Any, tmp_path: Any, name: str, field: str, default: int,
        highest: int) -> None:
    variable = f"LEDGERCORE_{name}"
    monkeypatch.setenv("LEDGERCORE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv(variable, raising=False)
    assert getattr(Settings.from_env(), field) == default
    for given, taken in (("0", 0), (str(highest), highest), ("5", 5), ("", default)):
        monkeypatch.setenv(variable, given)
        assert getattr(Settings.from_env(), field) == taken
    for bad in (str(highest + 1), "-1", "ten", "1.5"):
        monkeypatch.setenv(variable, bad)
        with pytest.raises(SystemExit, match=f"{name} must be an integer from 0 to {highest}"):
            Settings.from_env()
