"""Result file names: a taken name gets the next free _2, _3... and no existing file is ever replaced."""

from __future__ import annotations

import pytest

from trainers.errors import ConfigError
from trainers.io import refuse_existing, unique_path


def test_a_free_name_is_kept_and_a_taken_one_gets_the_next_free_number(tmp_path):
    assert unique_path(tmp_path, "portrait", ".safetensors") == tmp_path / "portrait.safetensors"
    (tmp_path / "portrait.safetensors").write_bytes(b"theirs")
    (tmp_path / "portrait_2.safetensors").write_bytes(b"also theirs")
    (tmp_path / "portrait_4.safetensors").write_bytes(b"and this")
    assert unique_path(tmp_path, "portrait", ".safetensors") == tmp_path / "portrait_3.safetensors"
    assert unique_path(tmp_path, "portrait", ".pt") == tmp_path / "portrait.pt"
    assert (tmp_path / "portrait.safetensors").read_bytes() == b"theirs"


def test_an_existing_result_is_refused_unless_overwrite_is_asked_for(tmp_path):
    taken = tmp_path / "portrait.safetensors"
    refuse_existing(taken, overwrite=False)
    taken.write_bytes(b"theirs")
    with pytest.raises(ConfigError, match="already exists"):
        refuse_existing(taken, overwrite=False)
    refuse_existing(taken, overwrite=True)
