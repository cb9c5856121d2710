"""Settings from the environment: the projector's priority."""

from __future__ import annotations

from typing import Any

import pytest

from infra.settings import Settings


def test_the_projector_nice_defaults_to_0_and_takes_0_to_19(monkeypatch: Any, tmp_path: Any) -> None:
    monkeypatch.setenv("LEDGERCORE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("LEDGERCORE_PROJECTOR_NICE", raising=False)
    assert Settings.from_env().projector_nice == 0
    for given, taken in (("0", 0), ("19", 19), ("5", 5), ("", 0)):
        monkeypatch.setenv("LEDGERCORE_PROJECTOR_NICE", given)
        assert Settings.from_env().projector_nice == taken
    for bad in ("20", "-1", "ten", "1.5"):
        monkeypatch.setenv("LEDGERCORE_PROJECTOR_NICE", bad)
        with pytest.raises(SystemExit, match="PROJECTOR_NICE must be an integer from 0 to 19"):
            Settings.from_env()
