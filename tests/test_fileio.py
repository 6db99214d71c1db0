"""ppmoco.fileio.replace_dir: a folder is replaced by renames, and never lost when that fails."""
import os

import pytest

from ppmoco import fileio


def folder(path, files):
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def contents(path):
    return {name: (path / name).read_text() for name in sorted(os.listdir(path))}


def test_replaces_the_old_folder_whole(tmp_path):
    # catches: copying the new files into the old folder (its other files would survive)
    folder(tmp_path / "final", {"old.txt": "old", "shared.txt": "old"})
    new = folder(tmp_path / ".final.tmp", {"shared.txt": "new"})
    fileio.replace_dir(str(new), str(tmp_path / "final"))
    assert contents(tmp_path / "final") == {"shared.txt": "new"}
    assert os.listdir(tmp_path) == ["final"]


def test_the_old_folder_is_back_when_the_new_one_cannot_take_its_place(tmp_path, monkeypatch):
    # catches: deleting (or leaving aside) the old folder before the new one is in place
    folder(tmp_path / "final", {"old.txt": "old"})
    new = folder(tmp_path / ".final.tmp", {"new.txt": "new"})
    rename = os.rename

    def fail_on_the_new_folder(src, dst):
        if src == str(new):
            raise OSError(28, "No space left on device", src)
        rename(src, dst)
    monkeypatch.setattr(fileio.os, "rename", fail_on_the_new_folder)
    with pytest.raises(OSError):
        fileio.replace_dir(str(new), str(tmp_path / "final"))
    assert contents(tmp_path / "final") == {"old.txt": "old"}
    assert sorted(os.listdir(tmp_path)) == [".final.tmp", "final"]
