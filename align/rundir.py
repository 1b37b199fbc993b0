"""What every stage writes, in one place:

    runs/<run>/<stage>/
      config.yaml     the resolved recipe (file + overrides) the stage ran with
      lineage.json    base model and its weights' identity, parent checkpoint, data files + sha256, git commit,
                      package versions, seed, command, start and end time, final results
      metrics.jsonl   one JSON object per logging step (the trainer's logs, plus align's own evaluations)
      checkpoint/     the stage's output; it exists only once complete: written as checkpoint.tmp/, then renamed.
                      Its align_manifest.json names the run that wrote it (lineage run_id) and each file's sha256:
                      a checkpoint left from an earlier run, or damaged since, is not taken for the stage's result
      trainer/        the trainer's resumable checkpoints (each with its manifest too)
      .lock           held while a run trains the stage: a second run on it stops at once, naming the holder

Only the main process writes; the others only take part in saving the model. Nothing is written, renamed or
deleted through a symbolic link in a run dir (a shared or downloaded one could point anywhere): a stage with a link
in its dir is refused before it starts (`refuse_links`), and align's own files are written by `write_file`, which
does not follow one.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import shutil
import subprocess
import sys
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

from align import registry
from align.errors import AlignError
from align.processes import is_main_process, wait_for_everyone
from align.recipe import ModelConfig, Recipe, to_yaml

log = logging.getLogger(__name__)

PACKAGES = ("align", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "omegaconf")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def sha256_of(path: str | Path) -> str:
    """sha256 of a file, or of a directory's files (relative names and contents, in sorted order)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


DIGESTS = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "align" / "digests.json"


def cached_sha256(file: Path) -> str:
    """sha256_of(file), remembered by path, size and modification time in ~/.cache/align/digests.json, so that
    a 7B base is hashed once, not on every stage and compare."""
    file = file.resolve()
    stat = file.stat()
    key, stamp = str(file), [stat.st_size, stat.st_mtime_ns]
    try:
        known = json.loads(DIGESTS.read_text())
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}  # a damaged cache is only a cache
    entry = known.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = sha256_of(file)
    known[key] = {"stamp": stamp, "sha256": digest}
    try:  # a cache: one that cannot be written only costs the hashing next time
        DIGESTS.parent.mkdir(parents=True, exist_ok=True)
        staging = DIGESTS.with_name(f"{DIGESTS.name}.{os.getpid()}.tmp")
        staging.write_text(json.dumps(known))
        staging.replace(DIGESTS)
    except OSError:
        pass
    return digest


def model_identity(cfg: ModelConfig) -> dict[str, Any]:
    """How to get these exact weights again: the sha256 of a local directory's weight files, or the hub commit
    that the revision resolved to (from the local cache when offline; None if it cannot be resolved)."""
    identity: dict[str, Any] = {"name_or_path": cfg.name_or_path, "revision": cfg.revision}
    local = Path(cfg.name_or_path)
    if local.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in local.iterdir() if p.suffix in WEIGHT_SUFFIXES):
            digest.update(cached_sha256(file).encode())
        identity["weights_sha256"] = digest.hexdigest()
    else:
        from transformers.utils.hub import resolve_revision

        identity["commit"] = getattr(resolve_revision(cfg.name_or_path, cfg.revision), "resolved", None)
    return identity


def git_commit() -> dict[str, Any] | None:
    """Commit of the align source that is running, and whether it had uncommitted changes."""
    here = Path(__file__).resolve().parent
    try:
        run = lambda *a: subprocess.run(["git", "-C", str(here), *a], capture_output=True, text=True, check=True)  # noqa: E731
        return {"commit": run("rev-parse", "HEAD").stdout.strip(), "dirty": bool(run("status", "--porcelain").stdout)}
    except (OSError, subprocess.CalledProcessError):
        return None  # installed from a wheel, or no git


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


class RunDirLinked(AlignError, RuntimeError):
    """A symbolic link where align would write in a run dir."""


def links_in(path: Path) -> list[Path]:
    """`path` itself if it is a symbolic link, else every link under it (none followed)."""
    if path.is_symlink():
        return [path]
    found = []
    for parent, dirs, files in os.walk(path):  # a linked directory is listed here, never entered
        found += [Path(parent, name) for name in sorted(dirs + files) if Path(parent, name).is_symlink()]
    return found


def refuse_links(*paths: Path) -> None:
    """Stops, naming each link and its target, if any of `paths` is or holds a symbolic link."""
    links = [link for path in paths for link in links_in(path)]
    if links:
        shown = "; ".join(f"{link} -> {os.readlink(link)}" for link in links[:20])
        more = f" (and {len(links) - 20} more)" if len(links) > 20 else ""
        raise RunDirLinked(
            f"symbolic link{'s' if len(links) > 1 else ''} in the run dir, where align would write: {shown}{more}. "
            "align does not write, rename or delete through a link (it could overwrite files outside the run dir); "
            "remove the link, or use a copy of the run dir with the files themselves (cp -rL)")


def write_file(path: Path, content: str | bytes, *, append: bool = False) -> None:
    """Writes (or appends) `content` to `path`, never through a symbolic link: a link there, or in place of its
    directory, is refused."""
    if path.parent.is_symlink():
        refuse_links(path.parent)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if append else os.O_TRUNC)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            refuse_links(path)
        raise
    with os.fdopen(fd, "ab" if append else "wb") as f:
        f.write(content.encode() if isinstance(content, str) else content)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a run dir's journal (metrics.jsonl, samples.jsonl). A last line cut short (what a kill
    while writing leaves) is dropped with a warning; a damaged line before it is an error naming it."""
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            if number < len(lines):
                raise AlignError(f"{path}:{number}: not a JSON record (the file was changed by hand?); fix or "
                                 "delete that line") from None
            log.warning("%s:%d: the last line is cut short (the run was killed while writing it); dropped",
                        path, number)
    return records


def replace_dir(staging: Path, target: Path) -> None:
    """Put a fully written `staging` directory at `target`, replacing what was there. The old target stays whole
    until the new one has its name, so `target` is never a half-written directory."""
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


MANIFEST = "align_manifest.json"


def write_manifest(directory: Path, **about: Any) -> None:
    """align_manifest.json in `directory`: the sha256 of every file in it (and `about`), written last."""
    files = {str(p.relative_to(directory)): sha256_of(p) for p in sorted(directory.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    write_file(directory / MANIFEST, json.dumps({**about, "files": files}, indent=1) + "\n")


def manifest_problem(directory: Path) -> str | None:
    """What is wrong with `directory` against its manifest (None: every file it lists is there, unchanged)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"it has no readable {MANIFEST} (cut short while saving, or written before align kept manifests)"
    for name, digest in files.items():
        if not (directory / name).is_file():
            return f"{name} is missing"
        if sha256_of(directory / name) != digest:
            return f"{name} is not the file the run wrote (cut short or changed since)"
    return None


def checkpoint_problem(stage_dir: str | Path) -> str | None:
    """Why `stage_dir`/checkpoint is not the stage's finished result (None: it is). It is only if it is intact
    (its manifest) and was written by the run that lineage.json describes, and that run finished."""
    stage_dir = Path(stage_dir)
    checkpoint = stage_dir / "checkpoint"
    if not checkpoint.is_dir():
        return f"there is no finished {stage_dir.name} checkpoint at {checkpoint}"
    problem = manifest_problem(checkpoint)
    if problem:
        return f"{checkpoint} is damaged: {problem}"
    try:
        lineage = json.loads((stage_dir / "lineage.json").read_text())
    except (OSError, ValueError):
        return f"{checkpoint} has no readable lineage.json beside it"
    written_by = json.loads((checkpoint / MANIFEST).read_text()).get("run_id")
    if written_by != lineage.get("run_id"):
        return (f"{checkpoint} is stale: an earlier run of the stage wrote it, not the run that lineage.json "
                f"describes (started {lineage.get('start_time')}, {'finished' if lineage.get('end_time') else 'unfinished'})")
    if not lineage.get("end_time"):
        return f"{checkpoint}: the run that wrote it did not finish (no end_time in lineage.json)"
    return None


def parent_problem(lineage: dict[str, Any]) -> str | None:
    """Why the parent checkpoint a stage's lineage names is not the one the stage started from (None: it is,
    or the stage had none): gone, changed since (its sha256), or recorded before align kept its digest."""
    parent = lineage.get("parent_checkpoint")
    if parent is None:
        return None
    recorded = lineage.get("parent_sha256")
    if recorded is None or not Path(parent).is_absolute():
        return (f"its parent checkpoint is recorded as {parent} without a digest (a run dir from before align "
                "recorded them), so which policy it started from cannot be checked")
    if not (Path(parent) / "adapter_config.json").is_file():
        return f"its parent checkpoint {parent} is gone"
    now = sha256_of(parent)
    if now != recorded:
        return (f"its parent checkpoint {parent} changed since the stage started from it (sha256 {recorded[:12]} "
                f"then, {now[:12]} now: trained again or edited)")
    return None


def base_problem(stage_dir: Path, model: ModelConfig) -> str | None:
    """Why the base model a stage's config.yaml names is not the one it trained on (None: it is, or lineage.json
    recorded no digest of it, as for a hub model): the sha256 of its weight files against lineage's."""
    try:
        recorded = json.loads((stage_dir / "lineage.json").read_text())["base_model"].get("weights_sha256")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if recorded is None or not Path(model.name_or_path).is_dir():
        return None
    now = model_identity(model).get("weights_sha256")
    if now != recorded:
        return (f"{stage_dir} trained on a base whose weights had sha256 {recorded}, and {model.name_or_path} (its "
                f"config.yaml's model.name_or_path) now has {now}: another model, or changed since")
    return None


def complete_checkpoint(stage_dir: str | Path) -> Path | None:
    """The stage's checkpoint if it is the stage's finished result (`checkpoint_problem`), else None."""
    return None if checkpoint_problem(stage_dir) else Path(stage_dir) / "checkpoint"


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("checkpoint-"))


def last_trainer_checkpoint(trainer_dir: Path) -> Path | None:
    """The latest intact resumable checkpoint-<step> in `trainer_dir`. One without its manifest (the run was
    killed while saving) or that no longer matches it (a file cut short) is removed, and logged, so that the run
    resumes from the one before and no later save trips over it."""
    found = sorted(trainer_dir.glob("checkpoint-*[0-9]"), key=step_of) if trainer_dir.is_dir() else []
    complete = []
    for checkpoint in found:
        problem = manifest_problem(checkpoint)
        if problem is None:
            complete.append(checkpoint)
        elif is_main_process():
            log.warning("%s cannot be resumed from (%s); removed, resuming from the one before it, if any",
                        checkpoint, problem)
            shutil.rmtree(checkpoint, ignore_errors=True)
    for staging in trainer_dir.glob("checkpoint-*.tmp") if trainer_dir.is_dir() else ():
        if is_main_process():
            shutil.rmtree(staging, ignore_errors=True)
    return complete[-1] if complete else None


class RunDirLocked(AlignError, RuntimeError):
    """Another run is training the same stage dir."""


@contextlib.contextmanager
def stage_lock(stage_dir: Path) -> Iterator[None]:
    """Holds `stage_dir`/.lock (an flock, so a killed run releases it) for the block; a second run on the same
    stage dir stops at once, naming the holder. Main process only: the others write nothing. A link in the stage
    dir, or the run dir or stage dir being one, stops it first (`refuse_links`): before any work."""
    if not is_main_process():
        yield
        return
    run_dir = stage_dir.parent  # run.root may be a link (the user's own choice of disk); below it none may
    refuse_links(run_dir if run_dir.is_symlink() else stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    with os.fdopen(os.open(stage_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise RunDirLocked(f"{stage_dir} is being written by another run ({holder}); wait for it to finish or "
                               "stop it, or give this run another run.name") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {utc_now()}: {' '.join(sys.argv)}\n")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)


# What every stage's result depends on besides its own keys (registry.Stage.keys) and the stages it starts from.
SHARED_KEYS = ("model", "lora", "run.seed", "data.columns", "data.system_prompt", "data.skip_invalid")


def stage_inputs(recipe: Recipe, stage: str) -> dict[str, Any]:
    """What a stage's result depends on, as flat `key: value`: its recipe keys, the sha256 of its local data
    files, and the digest of each earlier stage in the recipe (a changed SFT stage changes what the reward and
    RL stages start from). `align run` re-runs a finished stage whose inputs changed."""
    from omegaconf import OmegaConf

    spec = registry.stage(stage)
    recipe_dict = OmegaConf.to_container(OmegaConf.structured(recipe), enum_to_str=True)
    inputs: dict[str, Any] = {}
    for key in SHARED_KEYS + spec.keys:
        value = recipe_dict
        for part in key.split("."):
            value = value[part]
        inputs.update(_flat(key, value))
    files = recipe_dict["data"][spec.data]
    for path in filter(None, (files["train"], files["eval"])):
        if Path(path).exists():  # a hub dataset is named by its id (and revision) alone
            inputs[f"sha256({path})"] = sha256_of(path)
    for earlier in spec.upstream:
        if getattr(recipe, earlier) is not None:
            inputs[f"{earlier} stage"] = inputs_digest(stage_inputs(recipe, earlier))
    return inputs


def _flat(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for name, item in value.items() for k, v in _flat(f"{key}.{name}", item).items()}
    return {key: value}


def inputs_digest(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


class RunDir:
    def __init__(self, recipe: Recipe, stage: str):
        self.recipe = recipe
        self.stage = stage
        self.path = Path(recipe.run.root) / recipe.run.name / stage
        self.lineage: dict[str, Any] = {}
        self._before: dict[str, Any] | None = None

    config_path = property(lambda self: self.path / "config.yaml")
    lineage_path = property(lambda self: self.path / "lineage.json")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    checkpoint_path = property(lambda self: self.path / "checkpoint")
    samples_path = property(lambda self: self.path / "samples.jsonl")
    trainer_dir = property(lambda self: self.path / "trainer")

    def resume_from(self) -> Path | None:
        """The last complete resumable checkpoint of this stage (None: nothing to resume, start at step 0)."""
        checkpoint = last_trainer_checkpoint(self.trainer_dir)
        log.info(
            "%s: %s", self.stage, f"resuming from {checkpoint}" if checkpoint else
            f"nothing to resume in {self.trainer_dir}; starting from step 0")
        return checkpoint

    def start(self, *, base_model: dict[str, Any], data: list[dict[str, Any]], parent: str | None = None,
              resumed_from: Path | None = None, **details: Any) -> None:
        """Write config.yaml and the lineage known before training (`details`: what else the stage started
        from, e.g. its reward functions). Stages call it once everything is loaded and checked, just before
        training: a run that fails before then leaves an earlier run's files as they were. A new run starts from nothing: the previous run's metrics, samples and
        trainer checkpoints go; its finished checkpoint stays until replaced. A run resumed from the trainer
        checkpoint `resumed_from` keeps the trainer checkpoints, the metrics logged up to its step, and the
        held-out evaluation from before training (`evaluated_before`)."""
        self._before = None
        if resumed_from and self.lineage_path.is_file():  # read by every process: all of them skip the evaluation
            self._before = json.loads(self.lineage_path.read_text()).get("before")
        if not is_main_process():
            return
        refuse_links(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.samples_path.unlink(missing_ok=True)
        write_file(self.config_path, to_yaml(self.recipe))
        resumed_step = step_of(resumed_from) if resumed_from else None
        if resumed_step is None:
            if self.trainer_dir.exists():
                log.info("%s: a new run: the trainer checkpoints of the run before (%s) are removed", self.stage,
                         ", ".join(p.name for p in sorted(self.trainer_dir.glob("checkpoint-*"))) or "none")
            shutil.rmtree(self.trainer_dir, ignore_errors=True)
            write_file(self.metrics_path, "")
        else:
            kept = [r for r in self.logged() if r.get("step", 0) <= resumed_step]
            write_file(self.metrics_path, "".join(json.dumps(record) + "\n" for record in kept))
            details["resumed_from_step"] = resumed_step
        for item in data:
            item["sha256"] = sha256_of(item["path"])
        if parent is not None:  # absolute, and its digest: what compare and align run check it against later
            parent = str(Path(parent).resolve())
            details["parent_sha256"] = sha256_of(parent)
        inputs = stage_inputs(self.recipe, self.stage)
        self.lineage = {
            "stage": self.stage,
            "run": self.recipe.run.name,
            "base_model": base_model,
            "parent_checkpoint": parent,
            **details,
            "data": data,
            "seed": self.recipe.run.seed,
            "command": sys.argv,
            "git": git_commit(),
            "packages": package_versions(),
            "run_id": uuid.uuid4().hex,  # the finished checkpoint's manifest names it: see checkpoint_problem
            "start_time": utc_now(),
            "end_time": None,
            "inputs_sha256": inputs_digest(inputs),
            "inputs": inputs,
        }
        self._write_lineage()

    def evaluated_before(self, evaluate: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The held-out evaluation before training: `evaluate()`, kept in lineage.json at once so that a resumed
        run takes it from there instead of measuring (and logging) it again."""
        before = self._before if self._before is not None else evaluate()
        if is_main_process():
            self.lineage["before"] = before
            self._write_lineage()
        return before

    def logged(self) -> list[dict[str, Any]]:
        """The records in metrics.jsonl (on a resumed run: those up to its checkpoint)."""
        return read_jsonl(self.metrics_path) if self.metrics_path.is_file() else []

    def log_metrics(self, record: dict[str, Any]) -> None:
        if is_main_process():
            write_file(self.metrics_path, json.dumps(record) + "\n", append=True)

    def write_samples(self, rows: list[dict[str, Any]]) -> None:
        """samples.jsonl: the stage's held-out examples with its outputs, one JSON object per line."""
        if is_main_process():
            write_file(self.samples_path, "".join(json.dumps(row) + "\n" for row in rows))

    @contextlib.contextmanager
    def checkpoint(self) -> Iterator[Path]:
        """Yields a staging directory to save into; only if the block finishes is it renamed to checkpoint/.
        A run killed while saving leaves checkpoint.tmp/, which nothing takes for a finished checkpoint."""
        staging = self.path / "checkpoint.tmp"
        if is_main_process():
            shutil.rmtree(staging, ignore_errors=True)
        wait_for_everyone()
        yield staging
        wait_for_everyone()
        if is_main_process():
            write_manifest(staging, run_id=self.lineage["run_id"])
            replace_dir(staging, self.checkpoint_path)

    def finish(self, results: dict[str, Any]) -> None:
        if is_main_process():
            self.lineage.pop("before", None)  # it is in results now
            self.lineage.update(end_time=utc_now(), checkpoint=str(self.checkpoint_path), results=results)
            self._write_lineage()

    def _write_lineage(self) -> None:
        write_file(self.lineage_path, json.dumps(self.lineage, indent=2) + "\n")


def stage_model(stage_dir: Path, *, trust_remote_code: bool = False) -> ModelConfig | None:
    """How a stage loaded its base: the model section of its config.yaml (None without one). A run dir may come
    from anyone, so its model.trust_remote_code=true is not honoured: it is refused unless the user allows
    model code on the command line (`trust_remote_code`)."""
    from align.recipe import load_recipe

    config = Path(stage_dir) / "config.yaml"
    if not config.is_file():
        return None
    model = load_recipe(config).model
    if model.trust_remote_code and not trust_remote_code:
        raise AlignError(f"{config} sets model.trust_remote_code=true, and align does not run a model's own code "
                         f"because a run dir asks for it. If you trust {model.name_or_path} and its code, pass "
                         "--trust-remote-code")
    return model


POLICY_STAGES = tuple(s.name for s in reversed(registry.STAGES) if s.policy)  # the latest first


def policy_checkpoint(source: Path) -> Path:
    """The policy checkpoint a path names: itself, its stage's checkpoint/, or a run's RL (else SFT) checkpoint.
    A stage's checkpoint must be its finished result (`checkpoint_problem`); a bare adapter directory is taken
    as it is."""
    for candidate in (source, source / "checkpoint"):
        if (candidate / "adapter_config.json").is_file():
            stage_dir = candidate.parent
            if candidate.name == "checkpoint" and (stage_dir / "lineage.json").is_file():
                problem = checkpoint_problem(stage_dir)
                if problem:
                    raise AlignError(f"{problem}; re-run the {stage_dir.name} stage (align run <recipe> --from "
                                     f"{stage_dir.name})")
            return candidate
    finished = [s for s in POLICY_STAGES if complete_checkpoint(source / s)]
    finals = [s for s in finished if registry.stage(s).final]
    if len(finals) > 1:
        raise AlignError(f"{source} has both a {' and a '.join(finals)} checkpoint; name one: "
                         + " or ".join(str(source / s) for s in finals))
    if not finished:
        problems = [checkpoint_problem(source / s) for s in POLICY_STAGES if (source / s / "checkpoint").is_dir()]
        raise AlignError(f"{source}: no LoRA checkpoint here (adapter_config.json), nor a finished "
                         f"{'/'.join(POLICY_STAGES)} stage under it" + "".join(f"; {p}" for p in problems))
    return source / finished[0] / "checkpoint"
