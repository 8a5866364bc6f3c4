"""`atlas publish`: the built site committed onto a gh-pages branch, the user's checkout untouched.

Every fixture is built in code: a git repository in a temporary folder (one commit on main,
then a modified file, a staged file and an untracked one, so "untouched" means something)
holding a fake site (the `.atlas-site` marker, pages, a nested page, a file the user's
excludes would drop) and a config naming it. No atlas is built. git runs with an empty
global config and a fixed identity, so the machine's own settings play no part.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from atlas_builder import cli, publish as publishing, website
from atlas_builder.config import load_config
from atlas_builder.errors import AtlasError

from conftest import write_config

SITE = {
    ".atlas-site": "Built by Neuron Atlas; this folder is replaced on every build.\n",
    "index.html": "<!doctype html><title>home</title>\n",
    "tiny-cnn/conv/3/index.html": "<!doctype html><title>unit 3</title>\n",
    "static/search-index.json": "[]\n",  # *.json is in the repository's info/exclude
}
CONFIG = """
[atlas]
site_dir = "site"
[site]
title = "Tiny atlas"
version = "1.2"
[dataset]
source = "builtin:digits"
[[models]]
name = "digits-mlp"
source = "builtin:digits-mlp"
"""


def git(where: Path, *args: str, check: bool = True) -> str:
    return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, check=check).stdout


@pytest.fixture(autouse=True)
def git_env(tmp_path, monkeypatch):
    (tmp_path / "gitconfig").write_text("")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # a folder outside `project` is in no repository
    for who in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{who}_NAME", "Test")
        monkeypatch.setenv(f"GIT_{who}_EMAIL", "test@example.org")


@pytest.fixture
def project(tmp_path) -> Path:
    repo = tmp_path / "project"
    repo.mkdir()
    git(repo, "init", "--quiet", "-b", "main")
    (repo / "README.md").write_text("project\n")
    (repo / ".gitignore").write_text("site/\n")
    git(repo, "add", ".")
    git(repo, "commit", "--quiet", "-m", "first")
    (repo / "README.md").write_text("project, edited\n")
    (repo / "staged.txt").write_text("staged\n")
    git(repo, "add", "staged.txt")
    (repo / "untracked.txt").write_text("untracked\n")
    (repo / ".git" / "info" / "exclude").write_text("*.json\n")
    for name, text in SITE.items():
        (repo / "site" / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / "site" / name).write_text(text)
    write_config(repo, CONFIG)
    return repo


def state(repo: Path) -> tuple:
    """The user's checkout: current branch, HEAD, index, status and a modified file's text."""
    return (git(repo, "symbolic-ref", "HEAD"), git(repo, "rev-parse", "HEAD"), git(repo, "ls-files", "-s"),
            git(repo, "status", "--porcelain", "--ignored"), (repo / "README.md").read_text())


def files(repo: Path, branch: str = "gh-pages") -> set[str]:
    return set(git(repo, "ls-tree", "-r", "--name-only", branch).splitlines())


def commits(repo: Path, branch: str = "gh-pages") -> int:
    return int(git(repo, "rev-list", "--count", branch))


def worktrees(repo: Path) -> list[str]:
    return git(repo, "worktree", "list").splitlines()


def test_marker_is_the_one_website_writes():
    assert publishing.SITE_MARKER == website.MARKER


def test_first_publish_creates_an_orphan_branch_of_exactly_the_site(project):
    before = state(project)
    result = publishing.publish(load_config(project / "atlas.toml"), cname="Atlas.Example.org", cwd=project)

    assert files(project) == set(SITE) | {".nojekyll", "CNAME"}
    assert git(project, "show", "gh-pages:CNAME") == "atlas.example.org\n"
    for name, text in SITE.items():
        assert git(project, "show", f"gh-pages:{name}") == text
    assert commits(project) == 1
    assert git(project, "merge-base", "main", "gh-pages", check=False) == ""  # no shared history
    assert git(project, "log", "-1", "--format=%s", "gh-pages").strip() == \
        "Publish Neuron Atlas site: Tiny atlas, version 1.2"
    assert state(project) == before
    assert len(worktrees(project)) == 1  # the temporary worktree is gone
    assert result.changed and result.files == len(SITE) + 2
    assert result.commit == git(project, "rev-parse", "--short", "gh-pages").strip()
    assert str(result) == (f"committed {project / 'site'} ({len(SITE) + 2} files) to gh-pages as {result.commit}; "
                           f"run `git push origin gh-pages` to put it online")


def test_republish_removes_what_left_the_site_and_keeps_the_cname(project):
    cfg = load_config(project / "atlas.toml")
    publishing.publish(cfg, cname="atlas.example.org", cwd=project)
    before = state(project)
    (project / "site" / "tiny-cnn" / "conv" / "3" / "index.html").unlink()

    second = publishing.publish(cfg, cwd=project, message="New site")
    assert files(project) == set(SITE) - {"tiny-cnn/conv/3/index.html"} | {".nojekyll", "CNAME"}
    assert git(project, "show", "gh-pages:CNAME") == "atlas.example.org\n"  # set once, kept
    assert commits(project) == 2 and second.changed
    assert git(project, "log", "-1", "--format=%s", "gh-pages").strip() == "New site"

    third = publishing.publish(cfg, cwd=project)
    assert commits(project) == 2 and not third.changed and third.commit == second.commit
    assert "nothing to commit" in str(third)
    assert state(project) == before
    assert len(worktrees(project)) == 1


def test_the_config_folder_names_the_repository_when_the_current_folder_is_in_none(project, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    git(project, "remote", "add", "upstream", "https://example.org/atlas.git")
    result = publishing.publish(load_config(project / "atlas.toml"), cwd=elsewhere)
    assert commits(project) == 1
    assert f"run `git -C {project} push upstream gh-pages`" in str(result)


def test_cli_publishes_and_prints_one_line(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    assert cli.main(["publish", "atlas.toml", "--cname", "atlas.example.org"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("atlas: committed ") and "`git push origin gh-pages`" in out[0]
    assert "CNAME" in files(project)


def no_site(project: Path, tmp_path: Path) -> dict:
    (project / "site" / ".atlas-site").unlink()
    return {}


def missing_site(project: Path, tmp_path: Path) -> dict:
    for path in sorted((project / "site").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (project / "site").rmdir()
    return {}


def outside_git(project: Path, tmp_path: Path) -> dict:
    outside = tmp_path / "outside"
    (outside / "site").mkdir(parents=True)
    (outside / "site" / ".atlas-site").write_text("")
    write_config(outside, CONFIG)
    return {"config": outside / "atlas.toml", "cwd": outside}


def other_branch(project: Path, tmp_path: Path) -> dict:
    git(project, "branch", "docs")
    return {}


def no_git(project: Path, tmp_path: Path) -> dict:
    (tmp_path / "empty").mkdir()
    return {"path": str(tmp_path / "empty")}


ERRORS = {  # case -> (setup, publish arguments, CLI arguments, phrases the message must hold)
    "not a git repository": (outside_git, {}, [], ["is not inside a git repository", "git init"]),
    "git not installed": (no_git, {}, [], ["git is not installed", "install git"]),
    "site without the marker": (no_site, {}, [], ["not written by Neuron Atlas", ".atlas-site", "atlas build"]),
    "site folder missing": (missing_site, {}, [], ["does not exist", "atlas build", "atlas.site_dir"]),
    "cname with a scheme": (None, {"cname": "https://atlas.example.org/"}, ["--cname", "https://atlas.example.org/"],
                            ["not a bare host name", "--cname atlas.example.org"]),
    "cname with a port": (None, {"cname": "atlas.example.org:8080"}, ["--cname", "atlas.example.org:8080"],
                          ["not a bare host name"]),
    "cname with no dot": (None, {"cname": "localhost"}, ["--cname", "localhost"], ["not a bare host name"]),
    "branch checked out": (None, {"branch": "main"}, ["--branch", "main"], ["checked out in", "--branch NAME"]),
    "bad branch name": (None, {"branch": "bad..name"}, ["--branch", "bad..name"], ["not a valid branch name"]),
    "branch not ours": (other_branch, {"branch": "docs"}, ["--branch", "docs"], ["does not hold a Neuron Atlas site",
                                                                 "git branch -D docs"]),
}


@pytest.mark.parametrize("case", ERRORS)
def test_bad_input_is_one_clear_error(case, project, tmp_path, monkeypatch, capsys):
    setup, kwargs, argv, phrases = ERRORS[case]
    where = setup(project, tmp_path) if setup else {}
    config, cwd = where.get("config", project / "atlas.toml"), where.get("cwd", project)
    cfg = load_config(config)
    branches, before, path = git(project, "branch", "--list"), state(project), os.environ["PATH"]
    if "path" in where:
        monkeypatch.setenv("PATH", where["path"])

    with pytest.raises(AtlasError) as error:
        publishing.publish(cfg, cwd=cwd, **kwargs)
    for phrase in phrases:
        assert phrase in str(error.value)
    monkeypatch.chdir(cwd)
    assert cli.main(["publish", str(config), *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"atlas: error: {error.value}\n"
    assert "\n" not in str(error.value)

    monkeypatch.setenv("PATH", path)  # git back on PATH for the checks
    assert git(project, "branch", "--list") == branches and state(project) == before
    assert len(worktrees(project)) == 1
