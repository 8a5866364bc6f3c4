"""`atlas publish CONFIG`: commit the built site onto a `gh-pages` branch, ready for `git push`.

Owns finding the git repository (the current folder's, else the config file's folder's),
checking what it is given (the site folder, the branch, --cname), and the commit: made in a
git worktree in a temporary folder, removed afterwards, whose tree becomes exactly the site's
files plus `.nojekyll`, and `CNAME` (--cname writes it; without it, a CNAME already on the
branch is kept, so a custom domain set once survives). A new branch is an orphan (no history
shared with the user's branches); nothing changed means no commit. Every problem the user can
fix is an AtlasError saying what to do.

Does not build the site (build.py, website.py), push, fetch or talk to GitHub, and never
touches the user's checkout: its files, index, HEAD and current branch stay as they were.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import AtlasError

SITE_MARKER = ".atlas-site"  # the file every site Neuron Atlas writes holds (website.MARKER; a test checks they agree)
LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
HOST = re.compile(rf"{LABEL}(\.{LABEL})+")  # a bare host name, e.g. atlas.example.org (used with fullmatch)
DEFAULT_MESSAGE = "Publish Neuron Atlas site"


@dataclass(frozen=True)
class Published:
    """What `publish` did: `changed` is False when the branch already held this site (no commit made)."""
    site: Path
    branch: str
    commit: str  # short hash of the branch's tip
    changed: bool
    files: int
    push: str  # the command that puts it online

    def __str__(self) -> str:
        if not self.changed:
            return f"{self.branch} ({self.commit}) already holds {self.site} as it is; nothing to commit"
        return (f"committed {self.site} ({self.files} files) to {self.branch} as {self.commit}; "
                f"run `{self.push}` to put it online")


def publish(cfg, branch: str = "gh-pages", cname: str | None = None, message: str | None = None,
            cwd: Path | None = None) -> Published:
    """Commit the site of `cfg` (an AtlasConfig) onto `branch` of the repository containing `cwd`."""
    cwd = Path.cwd() if cwd is None else Path(cwd)
    site = Path(cfg.atlas.site_dir)
    if shutil.which("git") is None:
        raise AtlasError("git is not installed (or not on PATH); install git, then run atlas publish again")
    if cname is not None and not HOST.fullmatch(cname.lower()):
        raise AtlasError(f"--cname {cname!r} is not a bare host name; pass the domain alone, "
                         f"e.g. --cname atlas.example.org (no https://, path or port)")
    if not site.is_dir():
        raise AtlasError(f"site folder {site} does not exist; build it first (atlas build CONFIG), "
                         f"or set atlas.site_dir to the built site")
    if not (site / SITE_MARKER).is_file():
        raise AtlasError(f"{site} was not written by Neuron Atlas (it has no {SITE_MARKER} file); build the site "
                         f"with atlas build CONFIG, or set atlas.site_dir to a folder that build wrote")
    repo = _repository(cwd, cfg.base_dir)
    if not _succeeds(repo, "check-ref-format", "--branch", branch):
        raise AtlasError(f"--branch {branch!r} is not a valid branch name; pass one like gh-pages")
    _git(repo, "worktree", "prune")  # forget worktrees whose folders are gone (a run killed before its cleanup)
    ref = f"refs/heads/{branch}"
    for line in _git(repo, "worktree", "list", "--porcelain").splitlines():
        if line.startswith("worktree "):
            where = line[len("worktree "):]
        elif line == f"branch {ref}":
            raise AtlasError(f"branch {branch} is checked out in {where}; switch that checkout to another "
                             f"branch first (git switch OTHER), or publish to another branch with --branch NAME")
    exists = _succeeds(repo, "rev-parse", "--verify", "--quiet", ref)
    if exists and not _succeeds(repo, "cat-file", "-e", f"{ref}:{SITE_MARKER}"):
        raise AtlasError(f"branch {branch} exists and does not hold a Neuron Atlas site (no {SITE_MARKER} at its "
                         f"root), so publishing would replace what it holds; pass --branch with a new name, or "
                         f"delete it first (git branch -D {branch}) if you mean to replace it")
    if not exists and not _succeeds(repo, "rev-parse", "--verify", "--quiet", "HEAD"):
        raise AtlasError(f"the repository {repo} has no commit yet; commit something on your branch first, "
                         f"then publish again")

    temp = Path(tempfile.mkdtemp(prefix="atlas-publish-"))
    tree = temp / "worktree"
    try:
        if exists:
            _git(repo, "worktree", "add", "--quiet", "--no-checkout", str(tree), branch)
        else:
            _git(repo, "worktree", "add", "--quiet", "--no-checkout", "--detach", str(tree))
            _git(tree, "symbolic-ref", "HEAD", ref)  # an orphan: its first commit will have no parent
        _git(tree, "read-tree", "--empty")  # the commit holds what is added below, and nothing else
        shutil.copytree(site, tree, dirs_exist_ok=True)
        (tree / ".nojekyll").touch()
        if cname is not None:
            (tree / "CNAME").write_text(cname.lower() + "\n", encoding="utf-8")
        elif exists and not (tree / "CNAME").exists() and _succeeds(repo, "cat-file", "-e", f"{ref}:CNAME"):
            (tree / "CNAME").write_bytes(_git(repo, "show", f"{ref}:CNAME", text=False))
        # --force: the user's excludes (core.excludesFile, info/exclude) must not drop site files
        _git(tree, "add", "--all", "--force", ".")
        files = len(_git(tree, "ls-files", "-z").split("\0")) - 1
        changed = not exists or not _succeeds(tree, "diff", "--cached", "--quiet", "HEAD")
        if changed:
            title = cfg.site.title + (f", version {cfg.site.version}" if cfg.site.version else "")
            # --no-verify: the project's commit hooks are for its sources, not for generated pages
            _git(tree, "commit", "--quiet", "--no-verify", "-m", message or f"{DEFAULT_MESSAGE}: {title}")
        commit = _git(tree, "rev-parse", "--short", "HEAD").strip()
    finally:  # whatever happened: no worktree left behind (a failure here must not hide the first one)
        _succeeds(repo, "worktree", "remove", "--force", str(tree))
        shutil.rmtree(temp, ignore_errors=True)
        _succeeds(repo, "worktree", "prune")
    remotes = _git(repo, "remote").split()
    remote = "origin" if "origin" in remotes or not remotes else remotes[0]
    push = f"git push {remote} {branch}" if _toplevel(cwd) == repo else f"git -C {repo} push {remote} {branch}"
    return Published(site, branch, commit, changed, files, push)


def _repository(cwd: Path, config_dir: Path) -> Path:
    """The top folder of the git checkout holding cwd, else the one holding the config's folder."""
    repo = _toplevel(cwd) or _toplevel(config_dir)
    if repo is None:
        also = f" (nor is the config's folder, {config_dir})" if config_dir.resolve() != cwd.resolve() else ""
        raise AtlasError(f"{cwd} is not inside a git repository{also}; run atlas publish in your project's "
                         f"checkout (git init one if it has none)")
    return repo


def _toplevel(folder: Path) -> Path | None:
    """The top folder of the git checkout holding folder; None outside one."""
    try:
        top = _call(folder, ("rev-parse", "--show-toplevel")).stdout.strip() if folder.is_dir() else ""
    except subprocess.CalledProcessError:  # not in a repository, or in a bare one or a .git folder
        top = ""
    return Path(top) if top else None


def _call(where: Path, args: tuple[str, ...], text: bool = True) -> subprocess.CompletedProcess:
    # core.autocrlf=false: the branch gets the site's bytes, whatever the user's line-ending settings
    return subprocess.run(["git", "-c", "core.autocrlf=false", *args], cwd=where, capture_output=True, check=True,
                          text=text)


def _git(where: Path, *args: str, text: bool = True):
    """Run `git ARGS` in `where`; its stdout, or an AtlasError with git's own message."""
    try:
        return _call(where, args, text).stdout
    except subprocess.CalledProcessError as exc:
        error = exc.stderr if text else exc.stderr.decode(errors="replace")
        detail = " ".join(error.split()) or f"exit status {exc.returncode}"
        raise AtlasError(f"git {args[0]} failed: {detail}; fix that, then publish again") from None


def _succeeds(where: Path, *args: str) -> bool:
    """Whether `git ARGS` exits 0 in `where` (a question, not an action)."""
    try:
        _call(where, args)
    except subprocess.CalledProcessError:
        return False
    return True
